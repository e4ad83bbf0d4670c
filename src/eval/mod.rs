//! Evaluation on GSM8K / MATH-500: loading problem sets (`dataset`), grading responses offline
//! (`grade`, built on `extract`, `math_norm`, `math_eval`, `math_equiv`) and the optional external
//! judge hook (`judge`).

pub mod dataset;
pub mod extract;
pub mod grade;
pub mod judge;
pub mod math_equiv;
pub mod math_eval;
pub mod math_norm;
