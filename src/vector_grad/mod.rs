//! The gradient of a steering objective with respect to an additive residual vector, through
//! the frozen base model (hybrid.md §2.2): the CPU reference that the CUDA kernels are checked
//! against, generic over f32 (training) and f64 (the finite-difference check).
//!
//! - `float`: the `Float` trait (f32, f64).
//! - `frozen`: an example (ids, target positions P), what the vector cannot change (computed
//!   once by the model's own f32 forward), and the exact loss definition.
//! - `ops`: generic forward ops and their input-gradient twins (matmul, RMSNorm, RoPE, SiLU·mul).
//! - `attention`: causal attention over frozen-prefix + active keys, forward and backward.
//! - `grad`: blocks L+1..N−1, head and loss forward, then the backward, as a flat op list.
//!
//! The vector is added where `SteeringSet::layer` says: the residual after block L (hook point
//! L + 1 in `model.rs`).

pub mod attention;
pub mod float;
pub mod frozen;
pub mod grad;
pub mod ops;

pub use float::Float;
pub use frozen::{prepare, Example, Frozen};
pub use grad::{loss_grad, LossGrad};
