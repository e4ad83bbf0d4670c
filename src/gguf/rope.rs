//! Llama-3.1's `rope_freqs.weight` ([Dh/2] f32 factors, inv_freq_i is divided by factor_i)
//! turned back into the `llama3` `rope_scaling` parameters that config.json carries.
//!
//! Why this is possible: llama.cpp's converter computes the factors from the HF parameters
//! (factor F, low/high freq factors lf/hf, original context L) as 1 where the wavelength
//! 2π/freq < L/hf, F where it is > L/lf, and 1 / ((1 − s)/F + s) between, with
//! s = (L·freq/2π − lf)/(hf − lf). F is the largest factor. In the band, s is linear in freq:
//! s·(hf/lf) − (L/lf)·freq/2π = s − 1, so two or more band entries fix hf/lf and L/lf by least
//! squares. Only these ratios matter (scaling L, lf and hf together changes nothing), so lf = 1
//! is chosen, which is what every released Llama 3.x config uses; L and hf are then snapped to
//! an integer and a multiple of 1/1024 when that reproduces the factors equally well, which
//! gives back the published values (8192, 4) rather than 8192.0003.
//!
//! Transformers 4.57 drops this tensor when loading a GGUF (it is not in its name map) and sets
//! no rope_scaling, so it runs Llama-3.1 GGUFs with plain RoPE; we keep the scaling.

use crate::config::Llama3Scaling;

/// Relative agreement demanded between the file's factors and those the recovered parameters
/// give. llama.cpp's converter computes the factors in f32 (torch): freq, wavelen, L/wavelen,
/// the subtraction of lf (which cancels near the band's edge) and the final reciprocal each
/// round, a few ulp of 2^-24 amplified by at most F ≤ 32 near the edge. 1e-5 is well above
/// that and far below what a wrong parameter changes (≥ 1e-3 for any real model).
pub const FACTOR_RTOL: f64 = 1e-5;

/// The factor llama.cpp's converter writes for frequency `freq` under `s` (f64).
fn factor_of(freq: f64, s: &Llama3Scaling) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    let l = s.original_max_position_embeddings;
    if wavelen < l / s.high_freq_factor {
        1.0
    } else if wavelen > l / s.low_freq_factor {
        s.factor
    } else {
        let sm = (l / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        1.0 / ((1.0 - sm) / s.factor + sm)
    }
}

/// Largest relative difference between `factors` and those `s` gives.
fn worst(factors: &[f32], freqs: &[f64], s: &Llama3Scaling) -> f64 {
    factors
        .iter()
        .zip(freqs)
        .map(|(&f, &fr)| ((factor_of(fr, s) - f64::from(f)) / f64::from(f)).abs())
        .fold(0.0, f64::max)
}

/// The llama3 scaling whose factors equal `factors` (within `FACTOR_RTOL`) for RoPE base
/// `theta` and head dim `head_dim`; Ok(None) when every factor is 1 (no scaling). The error
/// says why the factors are not of the llama3 form.
pub fn llama3_from_factors(
    factors: &[f32],
    theta: f64,
    head_dim: usize,
) -> Result<Option<Llama3Scaling>, String> {
    let n = head_dim / 2;
    if factors.len() != n {
        return Err(format!(
            "expected {n} factors (head dim {head_dim} / 2), found {}",
            factors.len()
        ));
    }
    if let Some(i) = factors.iter().position(|f| !f.is_finite() || *f < 1.0) {
        return Err(format!(
            "factor {i} is {}, expected a finite value ≥ 1",
            factors[i]
        ));
    }
    let big = factors.iter().copied().fold(1.0f32, f32::max);
    if big == 1.0 {
        return Ok(None);
    }
    if factors.windows(2).any(|w| w[1] < w[0]) {
        return Err("expected factors rising with the dim index (falling frequency)".into());
    }
    let freqs: Vec<f64> = (0..n)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let f = f64::from(big);
    // The band between 1 and F: s from each factor, then s·hf − c·freq = s − 1 (c = L/2π).
    let band: Vec<(f64, f64)> = factors
        .iter()
        .zip(&freqs)
        .filter(|(&x, _)| x != 1.0 && x != big)
        .map(|(&x, &fr)| ((1.0 / f64::from(x) - 1.0 / f) / (1.0 - 1.0 / f), fr))
        .collect();
    if band.len() < 2 {
        return Err(format!(
            "{} factor(s) lie strictly between 1 and the largest ({big}); at least 2 are needed to recover the low/high frequency factors and the original context",
            band.len()
        ));
    }
    // Normal equations of the least-squares fit for (hf, c).
    let (mut a11, mut a12, mut a22, mut b1, mut b2) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(s, fr) in &band {
        let (x1, x2, y) = (s, -fr, s - 1.0);
        a11 += x1 * x1;
        a12 += x1 * x2;
        a22 += x2 * x2;
        b1 += x1 * y;
        b2 += x2 * y;
    }
    let det = a11 * a22 - a12 * a12;
    let hf = (b1 * a22 - b2 * a12) / det;
    let c = (a11 * b2 - a12 * b1) / det;
    let fitted = Llama3Scaling {
        factor: f,
        low_freq_factor: 1.0,
        high_freq_factor: hf,
        original_max_position_embeddings: 2.0 * std::f64::consts::PI * c,
    };
    if !(hf > 1.0 && fitted.original_max_position_embeddings > 0.0) {
        return Err(format!(
            "the band's factors fit high_freq_factor {hf} and original context {} (with low_freq_factor 1), expected values above 1 and 0",
            fitted.original_max_position_embeddings
        ));
    }
    let snapped = Llama3Scaling {
        high_freq_factor: (hf * 1024.0).round() / 1024.0,
        original_max_position_embeddings: fitted.original_max_position_embeddings.round(),
        ..fitted
    };
    let (e_fit, e_snap) = (
        worst(factors, &freqs, &fitted),
        worst(factors, &freqs, &snapped),
    );
    if e_snap <= FACTOR_RTOL.max(e_fit) {
        Ok(Some(snapped))
    } else if e_fit <= FACTOR_RTOL {
        Ok(Some(fitted))
    } else {
        Err(format!(
            "no llama3 scaling reproduces them: the best fit (factor {f}, high_freq_factor {hf}, original context {}) is off by {e_fit:.2e} relative, expected at most {FACTOR_RTOL:e}",
            fitted.original_max_position_embeddings
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The factors llama.cpp's converter writes for `s` (computed in f64, stored as f32).
    fn factors(s: &Llama3Scaling, theta: f64, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| factor_of(1.0 / theta.powf(2.0 * i as f64 / head_dim as f64), s) as f32)
            .collect()
    }

    fn llama3(factor: f64, lf: f64, hf: f64, l: f64) -> Llama3Scaling {
        Llama3Scaling {
            factor,
            low_freq_factor: lf,
            high_freq_factor: hf,
            original_max_position_embeddings: l,
        }
    }

    #[test]
    fn published_llama_3_parameters_come_back_exactly() {
        // Llama-3.1 8B (Dh 128, 6 band entries) and Llama-3.2 1B (Dh 64, factor 32, 3 entries).
        for (s, dh) in [
            (llama3(8.0, 1.0, 4.0, 8192.0), 128),
            (llama3(32.0, 1.0, 4.0, 8192.0), 64),
        ] {
            let f = factors(&s, 500000.0, dh);
            assert_eq!(llama3_from_factors(&f, 500000.0, dh), Ok(Some(s)));
        }
    }

    #[test]
    fn other_parameters_are_recovered_up_to_their_ratios() {
        // lf ≠ 1: only L/lf = 4666.67 and hf/lf = 2.4667 are determined; not snappable.
        let s = llama3(8.0, 1.5, 3.7, 7000.0);
        let f = factors(&s, 500000.0, 128);
        let r = llama3_from_factors(&f, 500000.0, 128).unwrap().unwrap();
        assert_eq!(r.low_freq_factor, 1.0);
        let rel = |a: f64, b: f64| ((a - b) / b).abs();
        // The f32 factors carry 2^-24 relative error, amplified by the 2×2 fit.
        assert!(
            rel(r.original_max_position_embeddings, 7000.0 / 1.5) < 1e-5,
            "{r:?}"
        );
        assert!(rel(r.high_freq_factor, 3.7 / 1.5) < 1e-5, "{r:?}");
        assert!(
            worst(
                &f,
                &(0..64)
                    .map(|i| 1.0 / 500000f64.powf(i as f64 / 64.0))
                    .collect::<Vec<_>>(),
                &r
            ) < 1e-6
        );
    }

    #[test]
    fn factors_not_of_the_llama3_form_are_errors() {
        assert_eq!(llama3_from_factors(&[1.0; 64], 500000.0, 128), Ok(None));
        let e = llama3_from_factors(&[1.0; 10], 500000.0, 128).unwrap_err();
        assert!(e.contains("64") && e.contains("10"), "{e}");
        let mut f = factors(&llama3(8.0, 1.0, 4.0, 8192.0), 500000.0, 128);
        f[3] = 0.5;
        assert!(llama3_from_factors(&f, 500000.0, 128)
            .unwrap_err()
            .contains("0.5"));
        // A step with no band cannot fix the thresholds.
        let step: Vec<f32> = (0..64).map(|i| if i < 30 { 1.0 } else { 8.0 }).collect();
        assert!(llama3_from_factors(&step, 500000.0, 128)
            .unwrap_err()
            .contains("at least 2"));
        // A band that is not of the llama3 shape.
        let mut f = factors(&llama3(8.0, 1.0, 4.0, 8192.0), 500000.0, 128);
        f[31] *= 1.01;
        let e = llama3_from_factors(&f, 500000.0, 128).unwrap_err();
        assert!(e.contains("no llama3 scaling"), "{e}");
    }
}
