//! thinksteer: a transformer runtime for SAE-gated hybrid reasoning.
//!
//! Shape vocabulary used in comments throughout:
//! B batch rows, T tokens (all rows of one step, flattened), S positions in a KV cache,
//! D model dim, H / Hkv query / key-value heads, Dh head dim, F ffn dim, V vocab, K SAE latents.

pub mod bench;
pub mod chart;
pub mod chat;
pub mod cli_args;
pub mod config;
pub mod cpu_ops;
pub mod cuda;
pub mod demo;
pub mod engine;
pub mod error;
pub mod eval;
pub mod files;
pub mod generate;
pub mod gguf;
pub mod hybrid;
pub mod memory;
pub mod model;
pub mod rng;
pub mod sae;
pub mod sampling;
pub mod sentences;
pub mod steering;
pub mod taxonomy;
pub mod tokenizer;
pub mod train_sae;
pub mod vector_grad;
pub mod weights;

pub use error::{Error, Result};
