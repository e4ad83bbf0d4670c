//! Evaluation on GSM8K / MATH-500: loading problem sets (`dataset`), grading responses offline
//! (`grade`, built on `extract`, `math_norm`, `math_eval`, `math_equiv`) and the optional external
//! judge hook (`judge`); running a whole evaluation with resumable results (`run`, `cli`) and
//! summarising it (`report`).

pub mod cli;
pub mod dataset;
pub mod extract;
pub mod grade;
pub mod judge;
pub mod math_equiv;
pub mod math_eval;
pub mod math_norm;
pub mod report;
pub mod run;
