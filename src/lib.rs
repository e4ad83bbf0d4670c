//! thinksteer: a transformer runtime for SAE-gated hybrid reasoning.
//!
//! Shape vocabulary used in comments throughout:
//! B batch rows, T tokens (all rows of one step, flattened), S positions in a KV cache,
//! D model dim, H / Hkv query / key-value heads, Dh head dim, F ffn dim, V vocab, K SAE latents.

pub mod error;
pub mod eval;

pub use error::{Error, Result};
