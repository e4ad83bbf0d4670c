//! The taxonomy subcommands of `thinksteer` (traces, activations, train-sae, annotate,
//! train-vectors): their argument structs and the functions `main.rs` dispatches to.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};

use crate::steering::SteeringSet;
use crate::train_sae::TrainConfig;

use super::vectors::BasePrefix;

#[derive(Args, Debug)]
pub struct TracesArgs {
    /// The thinking model's checkpoint folder (config.json, weights, tokenizer.json, chat template).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL file of questions (field `question`, or `problem`, or --question-field).
    #[arg(long)]
    pub questions: PathBuf,
    /// The JSONL field holding the question.
    #[arg(long)]
    pub question_field: Option<String>,
    /// Output JSONL, one trace per line; indices already in it are skipped (resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Maximum new tokens per trace.
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 2000)]
    pub max_new_tokens: usize,
    /// Questions generated together.
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 8)]
    pub batch: usize,
    /// Only the first N questions.
    #[arg(long, value_parser = crate::cli_args::count)]
    pub limit: Option<usize>,
    /// Give every trace without a `<think>` span its whole answer as the span, for a model that
    /// reasons without the tags (as `demo` does with its small model).
    #[arg(long)]
    pub whole_answer: bool,
    /// Where to run the generation.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: crate::eval::cli::EvalDevice,
}

#[derive(Args, Debug)]
pub struct ActivationsArgs {
    /// The thinking model's checkpoint folder (the model that wrote the traces).
    #[arg(long)]
    pub model: PathBuf,
    /// Traces JSONL written by `thinksteer traces`.
    #[arg(long)]
    pub traces: PathBuf,
    /// Block whose output is averaged over each sentence (0-based).
    #[arg(long)]
    pub layer: usize,
    /// Output safetensors (`activations` [N, D], `activation_mean` [D]); the index goes to
    /// the same name with extension `.index.jsonl`. While the run goes on, each trace's means
    /// are kept beside it, in its name with `.partial.f32` and `.progress.jsonl` appended: a
    /// killed run, started again with the same flags, runs only the traces not done yet.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the forward passes run (the GPU path: traces up to 16,384 tokens).
    #[arg(long, value_enum, default_value = "auto")]
    pub device: crate::eval::cli::EvalDevice,
}

#[derive(Args, Debug)]
pub struct TrainSaeArgs {
    /// Sentence activations written by `thinksteer activations`.
    #[arg(long)]
    pub acts: PathBuf,
    /// Dictionary sizes K to train, comma-separated.
    #[arg(
        long,
        value_parser = crate::cli_args::count,
        value_delimiter = ',',
        default_value = "5,10,15,20,25,30,35,40,45,50"
    )]
    pub latents: Vec<usize>,
    /// Top-k of the SAE.
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 3)]
    pub k: usize,
    /// Output folder: `sae-K.safetensors` and `sae-K.run.json` (settings, FVU per epoch) per
    /// size, and `fvu.md`. A size already there from the same activations and settings is kept.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the split, the initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Maximum epochs (early stopping with patience 10 may end sooner).
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 300)]
    pub max_epochs: usize,
    /// Rows per batch.
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 512)]
    pub batch: usize,
}

#[derive(Args, Debug)]
pub struct AnnotateArgs {
    /// The SAE (one `sae-K.safetensors` written by `thinksteer train-sae`).
    #[arg(long)]
    pub sae: PathBuf,
    /// Sentence activations the SAE reads.
    #[arg(long)]
    pub acts: PathBuf,
    /// The activations' index (default: the acts file with extension `.index.jsonl`).
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Output folder: `annotations.jsonl`, `report.md` and `categories.svg`; with --titles also
    /// `sae.safetensors`, the SAE with the titles in its metadata (give it to `hybrid` / `eval`
    /// as --sae, and their reports name the categories).
    #[arg(long)]
    pub out: PathBuf,
    /// Category names, one per latent (JSON list or one per line).
    #[arg(long)]
    pub titles: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VectorMethod {
    /// Difference of means of the base model's activations.
    MeanDiff,
    /// Gradient-trained vectors through the frozen base model (hybrid.md §2.2).
    Optimise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrefixArg {
    /// The base model reads the trace's own chat prompt before the text (the same text).
    Same,
    /// The base model reads the paper's plain base prompt before the text, as it does when
    /// steered (hybrid.md §2.2: "given the base prompt + the preceding trace").
    Plain,
}

#[derive(Args, Debug)]
pub struct TrainVectorsArgs {
    /// The base model's checkpoint folder (the model the vectors steer).
    #[arg(long)]
    pub base: PathBuf,
    /// Traces JSONL the annotations were made from.
    #[arg(long)]
    pub traces: PathBuf,
    /// `annotations.jsonl` written by `thinksteer annotate`.
    #[arg(long)]
    pub annotations: PathBuf,
    /// Base block at whose output the vectors are added (0-based).
    #[arg(long)]
    pub layer: usize,
    /// The reference code's quirk (hybrid.md §3): train the vectors at the input of block
    /// --layer (the output of the block before), though the hybrid loop adds them at its
    /// output. Recorded in the file (`trained_at`); the loop names it.
    #[arg(long)]
    pub at_block_input: bool,
    /// How the vectors are found.
    #[arg(long, value_enum, default_value = "mean-diff")]
    pub method: VectorMethod,
    /// What the base model reads before each trace's text.
    #[arg(long, value_enum, default_value = "plain")]
    pub prefix: PrefixArg,
    /// Output steering set (safetensors: bias [D], vectors [K, D]).
    #[arg(long)]
    pub out: PathBuf,
    /// Where the forward passes run (mean-diff) or the training runs (optimise: the frozen
    /// prefixes in the engine's bf16, the loss and gradient in f32, on GPU 0); auto picks the
    /// GPU when one is usable and its kernels take the base model.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: crate::eval::cli::EvalDevice,
    /// optimise: maximum epochs per vector.
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 50)]
    pub epochs: usize,
    /// optimise: Adam learning rate at the start of the cosine decay.
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    /// optimise: training examples per vector at most (sampled with --seed).
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 2048)]
    pub max_examples: usize,
    /// optimise: examples per Adam step (the loss is the mean over their target tokens).
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 6)]
    pub batch: usize,
    /// optimise: logits are multiplied by this before the softmax.
    #[arg(long, default_value_t = 0.7)]
    pub coldness: f32,
    /// optimise: stop a vector after this many epochs without a better held-out loss.
    #[arg(long, default_value_t = 5)]
    pub patience: usize,
    /// optimise: seed of the held-out split, the sampling and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// optimise: checkpoint written after every epoch (default: the output with extension
    /// `ckpt.json`).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// optimise: continue from the checkpoint, or start when there is none yet (one command
    /// starts and restarts a run); the same settings and examples are required.
    #[arg(long)]
    pub resume: bool,
    /// optimise: run at most this many epochs now, then stop with the checkpoint written.
    #[arg(long, value_parser = crate::cli_args::count)]
    pub stop_after: Option<usize>,
    /// optimise: GiB of frozen prefixes (each example's unsteered part) kept in memory between
    /// epochs instead of recomputed (default: half the memory available at the start).
    #[arg(long)]
    pub prefix_cache_gb: Option<f64>,
    /// optimise: loss curves CSV (epoch,split,vector,loss; default: the output with extension
    /// `curves.csv`); the chart goes beside it with extension `svg`.
    #[arg(long)]
    pub curves: Option<PathBuf>,
}

pub fn traces(mut a: TracesArgs) -> Result<()> {
    a.model = crate::gguf::checkpoint_dir(&a.model)?;
    if a.out.is_dir() {
        return Err(anyhow!(
            "--out {}: expected a traces file to write, found a folder",
            a.out.display()
        ));
    }
    let mut qs = crate::eval::dataset::load_questions(&a.questions, a.question_field.as_deref())?;
    if let Some(n) = a.limit {
        qs.truncate(n);
    }
    let s = super::traces::TraceSettings {
        max_new_tokens: a.max_new_tokens,
        batch: a.batch,
        cuda: a.device.use_cuda_for(&[&a.model])?,
        whole_answer: a.whole_answer,
    };
    let w = super::traces::write_traces(&a.model, &qs, &a.out, &s, |t| {
        let none = match a.whole_answer {
            true => "no thinking span (its whole answer will count)",
            false => "no thinking span",
        };
        let span = t.thinking.map_or(none.to_string(), |s| {
            format!("thinking {} bytes", s.end - s.start)
        });
        eprintln!("trace {}: {} bytes, {span}", t.index, t.text.len());
    })?;
    println!(
        "{}: wrote {} traces, skipped {} already present",
        a.out.display(),
        w.written,
        w.skipped
    );
    if let Some((own, filled)) = w.spans {
        println!(
            "{own} traces with a <think> span from the model, {filled} given their whole answer"
        );
    }
    Ok(())
}

pub fn activations(mut a: ActivationsArgs) -> Result<()> {
    a.model = crate::gguf::checkpoint_dir(&a.model)?;
    crate::files::check_folder_of(&a.out, "--out")?;
    let cuda = a.device.use_cuda_for(&[&a.model])?;
    let rep = super::activations::compute_activations(&a.model, &a.traces, a.layer, &a.out, cuda)?;
    println!(
        "{}: {} sentences from {} traces ({} traces without a thinking span{}, {} with no sentence of 3+ words{})",
        a.out.display(),
        rep.sentences,
        rep.traces,
        rep.no_thinking.len(),
        list(&rep.no_thinking),
        rep.no_sentences.len(),
        list(&rep.no_sentences)
    );
    if rep.uncovered > 0 {
        println!("{} sentences had no token and were left out", rep.uncovered);
    }
    if rep.resumed > 0 {
        println!(
            "{} traces' means were kept from a killed run (not run again)",
            rep.resumed
        );
    }
    println!(
        "index: {}",
        super::activations::index_path(&a.out).display()
    );
    Ok(())
}

fn list(ix: &[usize]) -> String {
    if ix.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = ix.iter().take(20).map(|i| i.to_string()).collect();
    let more = if ix.len() > 20 { ", …" } else { "" };
    format!(": {}{more}", shown.join(", "))
}

pub fn train_sae(a: TrainSaeArgs) -> Result<()> {
    if let Some(k) = (1..a.latents.len()).find(|&i| a.latents[..i].contains(&a.latents[i])) {
        return Err(anyhow!(
            "--latents: expected each size once, found {} twice",
            a.latents[k]
        ));
    }
    let base = TrainConfig {
        k: a.k,
        seed: a.seed,
        max_epochs: a.max_epochs,
        batch: a.batch,
        ..Default::default()
    };
    let rs = super::sizes::train_sizes(&a.acts, &a.latents, &base, &a.out, |_, _, _, _| {})?;
    for r in &rs {
        println!(
            "K = {:>3}: validation FVU {:.4} (best epoch {} of {}) → {}{}",
            r.latents,
            r.report.final_val_fvu,
            r.report.best_epoch + 1,
            r.report.val_fvu.len(),
            r.path.display(),
            if r.kept {
                " (kept: trained before on the same activations and settings)"
            } else {
                ""
            }
        );
    }
    if let Some((k, what)) = super::sizes::pick_size(&rs) {
        println!(
            "picked K = {k} (smallest within {} of the best {what}); table in {}",
            super::sizes::PICK_WITHIN,
            a.out.join("fvu.md").display()
        );
    }
    Ok(())
}

pub fn annotate(a: AnnotateArgs) -> Result<()> {
    let index = a
        .index
        .clone()
        .unwrap_or_else(|| super::activations::index_path(&a.acts));
    let counts = super::annotate::annotate(&a.sae, &a.acts, &index, a.titles.as_deref(), &a.out)?;
    let n: usize = counts.iter().sum();
    if a.titles.is_some() {
        println!(
            "the SAE named by these titles: {} (its --sae for hybrid and eval names the categories in their reports)",
            super::annotate::titled_sae_path(&a.out).display()
        );
    }
    println!(
        "{} sentences in {} categories (counts {:?}); report in {}",
        n,
        counts.len(),
        counts,
        a.out.join("report.md").display()
    );
    Ok(())
}

pub fn train_vectors(mut a: TrainVectorsArgs) -> Result<()> {
    crate::files::check_folder_of(&a.out, "--out")?;
    a.base = crate::gguf::checkpoint_dir(&a.base)?;
    // Trained at the input of block L = at the output of block L − 1; labelled L afterwards.
    let layer = a.layer;
    if a.at_block_input {
        a.layer = layer.checked_sub(1).ok_or_else(|| {
            anyhow!("--at-block-input: expected --layer 1 or more (the input of block 0 is the embedding), found 0")
        })?;
    }
    let label = |mut set: SteeringSet| {
        set.layer = layer;
        set.trained_at_block_input = a.at_block_input;
        set
    };
    let prefix = match a.prefix {
        PrefixArg::Same => BasePrefix::SameAsTrace,
        PrefixArg::Plain => BasePrefix::Plain,
    };
    let cuda = a.device.use_cuda_for(&[&a.base])?;
    if a.method == VectorMethod::Optimise {
        return train_vectors_optimise(&a, prefix, cuda, label);
    }
    let (set, rep) =
        super::vectors::mean_diff(&a.base, &a.traces, &a.annotations, a.layer, prefix, cuda)?;
    let set = label(set);
    set.save(&a.out)?;
    println!(
        "{}: bias (norm {:.3}) and {} category vectors at block {}{} from {} sentences and {} non-thinking tokens; sentences per category {:?}",
        a.out.display(),
        set.bias.iter().map(|x| x * x).sum::<f32>().sqrt(),
        set.count,
        set.layer,
        trained_at(&set),
        rep.sentences,
        rep.non_thinking_tokens,
        rep.per_category
    );
    if !rep.empty_categories.is_empty() {
        println!(
            "categories with no sentence (zero vectors): {:?}",
            rep.empty_categories
        );
    }
    Ok(())
}

/// " (trained at its input)" for `--at-block-input` vectors, for the lines that name the block.
fn trained_at(set: &SteeringSet) -> &'static str {
    if set.trained_at_block_input {
        " (trained at its input)"
    } else {
        ""
    }
}

fn train_vectors_optimise(
    a: &TrainVectorsArgs,
    prefix: BasePrefix,
    cuda: bool,
    label: impl Fn(SteeringSet) -> SteeringSet,
) -> Result<()> {
    use super::optimise::{curves_csv, curves_svg, optimise, sibling, OptimiseSettings};
    if let Some(g) = a.prefix_cache_gb.filter(|g| !(g.is_finite() && *g >= 0.0)) {
        return Err(anyhow!(
            "--prefix-cache-gb: expected a non-negative number of GiB, found {g}"
        ));
    }
    let ckpt = a
        .checkpoint
        .clone()
        .unwrap_or_else(|| sibling(&a.out, "ckpt.json"));
    let csv = a
        .curves
        .clone()
        .unwrap_or_else(|| sibling(&a.out, "curves.csv"));
    crate::files::check_folder_of(&ckpt, "--checkpoint")?;
    crate::files::check_folder_of(&csv, "--curves")?;
    let s = OptimiseSettings {
        layer: a.layer,
        epochs: a.epochs,
        lr: a.lr,
        max_examples: a.max_examples,
        batch: a.batch,
        coldness: a.coldness,
        patience: a.patience,
        seed: a.seed,
        stop_after: a.stop_after,
        cuda,
        prefix_cache_bytes: a
            .prefix_cache_gb
            .map(|g| (g * (1u64 << 30) as f64) as usize),
    };
    let (rep, curves) = optimise(
        &a.base,
        &a.traces,
        &a.annotations,
        prefix,
        &s,
        &ckpt,
        a.resume,
    )?;
    crate::files::write_atomic(&csv, curves_csv(&curves).as_bytes())?;
    let svg = csv.with_extension("svg");
    crate::files::write_atomic(&svg, curves_svg(&curves).as_bytes())?;
    for v in &rep.summaries {
        println!(
            "{}: {} training and {} held-out examples, {} epochs{}",
            v.vector,
            v.train_examples,
            v.val_examples,
            v.epochs,
            if v.early_stopped { " (early stop)" } else { "" }
        );
    }
    let Some(set) = rep.set else {
        println!(
            "stopped after {} epochs; checkpoint {}: rerun with --resume to continue",
            rep.epochs_run,
            ckpt.display()
        );
        return Ok(());
    };
    let set = label(set);
    set.save(&a.out)?;
    println!(
        "{}: bias (norm {:.3}) and {} category vectors at block {}{}, optimised; curves {} and {}",
        a.out.display(),
        set.bias.iter().map(|x| x * x).sum::<f32>().sqrt(),
        set.count,
        set.layer,
        trained_at(&set),
        csv.display(),
        svg.display()
    );
    if !rep.empty_categories.is_empty() {
        println!(
            "categories with no sentence (zero vectors): {:?}",
            rep.empty_categories
        );
    }
    Ok(())
}
