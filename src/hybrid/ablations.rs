//! The paper's ablations and the reference code's quirks (hybrid.md §3), as the flags that
//! `hybrid` and `eval` share and as an evaluation records them in its config.json.

use clap::Args;
use serde::{Deserialize, Serialize};

use std::path::Path;

use super::Settings;
use crate::error::Result;
use crate::steering::SteeringSet;

#[derive(Args, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ablations {
    /// Ablation: add only the bias vector.
    #[arg(long)]
    pub only_bias: bool,
    /// Ablation: pick the category at random (seeded by --seed) instead of by the SAE. Every
    /// problem draws from the same seeded sequence, step by step, so a batched, resumed or
    /// sharded run draws as one problem alone does.
    #[arg(long)]
    pub random_firing: bool,
    /// Ablation: random directions scaled to the norms of the loaded vectors (seeded by --seed).
    #[arg(long)]
    pub random_vectors: bool,
    /// With --random-vectors: directions of norm 1 instead, as the reference code drew them
    /// (its quirk, hybrid.md §3; learned vectors have norms of 50–220).
    #[arg(long, requires = "random_vectors")]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub random_unit_norm: bool,
    /// Ablation: steer every step, whether or not the models agree.
    #[arg(long)]
    pub no_gating: bool,
    /// Add the vectors at the input of block L_b instead of its output: where the reference
    /// code trained its vectors (it added them at the output; `train-vectors --at-block-input`
    /// reproduces that quirk).
    #[arg(long)]
    pub steer_at_block_input: bool,
    /// The reference code's quirk: feed the SAE raw activations (no centring, no unit norm).
    #[arg(long)]
    pub sae_raw_activations: bool,
    /// Seed of the random ablations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Ablations {
    /// Whether none is asked for (the seed alone changes nothing).
    pub fn is_none(&self) -> bool {
        self.names().is_empty()
    }

    /// As an evaluation records them: the seed only where a random ablation uses it (so a rerun
    /// with another --seed and no random ablation still matches).
    pub fn recorded(&self) -> Ablations {
        let mut a = self.clone();
        if !(a.random_firing || a.random_vectors) {
            a.seed = 0;
        }
        a
    }

    /// The loop's side of them.
    pub fn apply(&self, s: &mut Settings) {
        s.only_bias = self.only_bias;
        s.random_firing = self.random_firing.then_some(self.seed);
        s.no_gating = self.no_gating;
        s.steer_at_block_input = self.steer_at_block_input;
        s.sae_raw_activations = self.sae_raw_activations;
    }

    /// The steering set the loop adds: the file's, or with --random-vectors random directions
    /// of its vectors' norms. Says on stderr when the vectors are added at another point of
    /// block L_b than they were trained at.
    pub fn load_steering(&self, path: &Path) -> Result<SteeringSet> {
        let set = SteeringSet::load(path)?;
        if let Some(note) = set.placement_note(path, self.steer_at_block_input) {
            eprintln!("{note}");
        }
        Ok(if self.random_vectors {
            set.randomized_like(self.seed, self.random_unit_norm)
        } else {
            set
        })
    }

    /// The flags set, as a reader would name them ("random firing (seed 3)").
    pub fn names(&self) -> Vec<String> {
        let seeded = |name: &str| format!("{name} (seed {})", self.seed);
        [
            (self.only_bias, "only bias".to_string()),
            (self.random_firing, seeded("random firing")),
            (
                self.random_vectors,
                match self.random_unit_norm {
                    true => seeded("random unit-norm vectors (the reference code's quirk)"),
                    false => seeded("random vectors"),
                },
            ),
            (self.no_gating, "no gating".to_string()),
            (
                self.steer_at_block_input,
                "steering at the block input".to_string(),
            ),
            (
                self.sae_raw_activations,
                "raw SAE activations (the reference code's quirk)".to_string(),
            ),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_reach_the_settings_and_are_named() {
        let none = Ablations {
            seed: 9,
            ..Ablations::default()
        };
        assert!(none.is_none(), "the seed alone is no ablation");
        let mut s = Settings::default();
        none.apply(&mut s);
        assert_eq!(s.random_firing, None);
        let a = Ablations {
            only_bias: true,
            random_firing: true,
            no_gating: true,
            steer_at_block_input: true,
            sae_raw_activations: true,
            seed: 3,
            ..Ablations::default()
        };
        a.apply(&mut s);
        assert!(s.only_bias && s.no_gating && s.steer_at_block_input && s.sae_raw_activations);
        assert_eq!(s.random_firing, Some(3));
        assert_eq!(a.names().len(), 5);
        assert_eq!(a.names()[1], "random firing (seed 3)");
        assert_eq!(a.recorded().seed, 3, "a random ablation keeps its seed");
        let bias = Ablations {
            only_bias: true,
            seed: 3,
            ..Ablations::default()
        };
        assert_eq!(bias.recorded().seed, 0, "no random ablation: no seed");
        // Recorded only when set, so configurations written before it still match.
        let rv = Ablations {
            random_vectors: true,
            seed: 2,
            ..Ablations::default()
        };
        let json = serde_json::to_string(&rv).unwrap();
        assert!(!json.contains("unit_norm"), "{json}");
        let unit = Ablations {
            random_unit_norm: true,
            ..rv.clone()
        };
        assert_eq!(
            unit.names(),
            ["random unit-norm vectors (the reference code's quirk) (seed 2)"]
        );
        let back: Ablations = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rv);
    }
}
