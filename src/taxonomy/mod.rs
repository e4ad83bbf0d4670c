//! Taxonomy discovery (hybrid.md §2.1–2.2): thinking-model traces → sentence activations →
//! top-k SAEs of several sizes → a category per sentence and a report → mean-diff steering
//! vectors for the base model. Each stage reads the previous stage's files, so a long run can
//! be resumed or inspected between stages.
//!
//! - `traces`: chat-template prompts, batched greedy generation, one JSON line per question.
//! - `spans`: sentence byte ranges → token spans, and the truncated forward that captures the
//!   output of one block.
//! - `activations`: sentence means of a block's output, centred and unit-norm, plus an index.
//! - `sizes`: SAE training over dictionary sizes and the FVU table.
//! - `annotate`: categories, the per-category report and the transition table.
//! - `vectors`: the difference-of-means steering set.
//! - `optimise`: gradient-trained steering vectors (Adam through the frozen base model).
//! - `cli`: argument structs and the `thinksteer` subcommands over all of the above.

pub mod activations;
pub mod annotate;
pub mod cli;
pub mod optimise;
pub mod sizes;
pub mod spans;
pub mod traces;
pub mod vectors;
