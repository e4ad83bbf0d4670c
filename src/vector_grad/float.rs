//! `Float`: the few operations the steering-vector gradient needs, implemented for f32 (training)
//! and f64 (the finite-difference check). Weights stay f32 in both cases and are widened with
//! `of`, which is exact for f64, so the f64 path differs from the f32 one only in rounding.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

pub trait Float:
    Copy
    + Debug
    + Default
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    /// Machine epsilon (for tolerances).
    const EPS: f64;
    fn of(x: f32) -> Self;
    fn of64(x: f64) -> Self;
    fn to64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn sin_cos(self) -> (Self, Self);
    fn max(self, other: Self) -> Self;
    fn neg_infinity() -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const EPS: f64 = <$t>::EPSILON as f64;
            #[inline]
            fn of(x: f32) -> Self {
                x as $t
            }
            #[inline]
            fn of64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn to64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn sin_cos(self) -> (Self, Self) {
                <$t>::sin_cos(self)
            }
            #[inline]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline]
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
        }
    };
}

impl_float!(f32);
impl_float!(f64);
