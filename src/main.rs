//! The `thinksteer` command line. Every failure prints one line and exits with code 2.

use anyhow::{anyhow, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use thinksteer::chat::{ChatTemplate, Message};
use thinksteer::cuda::model::call_rows;
use thinksteer::engine::Checkpoint;
use thinksteer::generate::{generate, GenParams};
use thinksteer::model::{Hooks, Step};
use thinksteer::sampling::SamplingParams;
use thinksteer::tokenizer::Tokenizer;

#[derive(Parser)]
#[command(
    name = "thinksteer",
    version,
    about = "A transformer runtime for SAE-gated hybrid reasoning"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Write the logits of every prompt position (and captured residuals) to a safetensors file.
    Logits(LogitsArgs),
    /// The hybrid loop: the base model generates, the thinking model steers it through an SAE.
    Hybrid(HybridArgs),
    /// Write a random SAE for a model layer (to try the hybrid loop without trained artifacts).
    RandomSae(RandomSaeArgs),
    /// Write a random steering set for a model layer.
    RandomVectors(RandomVectorsArgs),
    /// Grade one response against a reference answer.
    Grade(GradeArgs),
    /// Prefill and decode throughput, achieved bandwidth and % of the memory-bandwidth floor.
    Bench(BenchArgs),
    /// Thinking-model traces: chat-template prompts, greedy generation, one JSON line each.
    Traces(thinksteer::taxonomy::cli::TracesArgs),
    /// Sentence activations of one block over the traces' thinking spans.
    Activations(thinksteer::taxonomy::cli::ActivationsArgs),
    /// Top-k SAEs of several sizes on sentence activations, and the FVU table.
    TrainSae(thinksteer::taxonomy::cli::TrainSaeArgs),
    /// The category of every sentence and a report per category.
    Annotate(thinksteer::taxonomy::cli::AnnotateArgs),
    /// A steering set for the base model from annotated traces.
    TrainVectors(thinksteer::taxonomy::cli::TrainVectorsArgs),
    /// Evaluate base, thinking and hybrid on GSM8K / MATH-500 (resumable, shardable).
    Eval(thinksteer::eval::cli::EvalArgs),
    /// Merge an evaluation folder's results into report.md.
    Report(thinksteer::eval::cli::ReportArgs),
    /// Convert a GGUF file (llama / qwen2) into a checkpoint folder.
    Convert(ConvertArgs),
    /// Compile the CUDA kernels with NVRTC into the kernel cache, for a GPU machine without
    /// NVRTC or to spare the first GPU command its compile time (no GPU needed).
    Kernels(KernelsArgs),
    /// The whole pipeline on the small demo model, sized for a CPU: traces, activations, SAE,
    /// categories, vectors, base/thinking/hybrid evaluation and report (resumable).
    Demo(DemoArgs),
}

#[derive(Args)]
struct ConvertArgs {
    /// The GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K tensors;
    /// byte-level BPE tokenizer).
    #[arg(long)]
    gguf: PathBuf,
    /// Folder to write config.json, model.safetensors (f32), tokenizer.json and
    /// tokenizer_config.json into (created if missing).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct KernelsArgs {
    /// Compute capabilities ×10 to compile for (80: A100, 90: H100 / H200).
    #[arg(long, value_delimiter = ',', default_value = "80,90")]
    arch: Vec<u32>,
    /// The cache folder (default: THINKSTEER_KERNEL_CACHE, else $XDG_CACHE_HOME/thinksteer/kernels,
    /// else ~/.cache/thinksteer/kernels).
    #[arg(long)]
    cache: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Device {
    Cpu,
    Cuda,
    /// CUDA when a GPU is usable, else the CPU.
    Auto,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
struct PromptArgs {
    /// Checkpoint folder (config.json, model.safetensors or sharded index, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs tokenizer.json in the model folder).
    #[arg(long)]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user turn in the model's chat template (with the generation prompt).
    #[arg(long)]
    chat: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    /// Maximum number of new tokens.
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens; 0 disables it.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object {"prompt_ids", "ids", "text"} instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    /// Output safetensors file: `logits` [T, V] and `resid.L` [T, D] per captured layer.
    #[arg(long)]
    out: PathBuf,
    /// Capture the output of decoder block L (0-based; repeatable).
    #[arg(long = "capture-layer")]
    capture_layer: Vec<usize>,
}

#[derive(Args)]
struct HybridArgs {
    /// The base model's checkpoint folder (it generates; steering is added to it).
    #[arg(long)]
    base: PathBuf,
    /// The thinking model's checkpoint folder (it picks when and which vector).
    #[arg(long)]
    thinking: PathBuf,
    /// SAE on the thinking model's residual (safetensors: W_enc, b_enc, W_dec, b_dec).
    #[arg(long)]
    sae: PathBuf,
    /// Steering set for the base model (safetensors: bias, vectors).
    #[arg(long)]
    vectors: PathBuf,
    /// One question.
    #[arg(
        long,
        conflicts_with = "questions",
        required_unless_present = "questions"
    )]
    question: Option<String>,
    /// A JSONL file of questions (field `question`, or `problem`, or --question-field).
    #[arg(long)]
    questions: Option<PathBuf>,
    /// The JSONL field holding the question (with --questions).
    // `requires` alone does not refuse it beside --question: clap waives a requirement that
    // conflicts with an argument present, and --questions conflicts with --question.
    #[arg(long, requires = "questions", conflicts_with = "question")]
    question_field: Option<String>,
    /// With --questions: at most the first N (runs to keep, resume and grade go through `eval`).
    #[arg(
        long,
        value_parser = thinksteer::cli_args::count,
        requires = "questions",
        conflicts_with = "question"
    )]
    limit: Option<usize>,
    /// exact (recompute: the oracle), cached (default; KV caches, the same function as exact
    /// for any windows), persistent (our extension: the winner's steering stays; windows -1).
    #[arg(long, value_enum, default_value = "cached")]
    mode: thinksteer::hybrid::Mode,
    /// Steering coefficients C (outer loop of candidates).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
        allow_hyphen_values = true
    )]
    coefficients: Vec<f32>,
    /// Windows W (inner loop): 0 = every position, -N = the last N positions (the paper's:
    /// 0,-1,-15,-50,-100).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "-1",
        allow_hyphen_values = true
    )]
    windows: Vec<i64>,
    /// Maximum new tokens per question.
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = 2000)]
    max_new_tokens: usize,
    /// Questions decoded together (cached and persistent modes).
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = 8)]
    batch: usize,
    /// The base model's prompt; {question} is replaced (default: the paper's plain prompt).
    #[arg(long)]
    base_prompt: Option<String>,
    /// Give the thinking model the plain prompt too instead of its chat template.
    #[arg(long)]
    thinking_plain: bool,
    #[command(flatten)]
    ablations: thinksteer::hybrid::ablations::Ablations,
    /// With window 0 (cached mode): base-model cache slots (in the blocks from the steering point
    /// on) that keep window-0 candidates' steered K/V, one per (question, category,
    /// coefficient), so that a candidate steered
    /// again runs only the new positions (default: one per question slot, category and
    /// coefficient, as many as fit a quarter of the free memory; 0: none).
    #[arg(long)]
    prefix_caches: Option<usize>,
    /// On the GPU: the thinking model on CUDA device N (an ordinal after CUDA_VISIBLE_DEVICES),
    /// the base model on device 0, for a pair that does not fit one card (e.g. two 32B models
    /// on two 80 GB cards). The two exchange ids and the SAE layer's residual through the host
    /// every step (the loop the paper's windows take), not the one-graph step.
    #[arg(long)]
    thinking_gpu: Option<usize>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// One JSON line per question as it finishes (so in the order they finish): index (the
    /// question's row), question, ids, text, steps, stats.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RandomSaeArgs {
    /// The (thinking) model the SAE reads.
    #[arg(long)]
    model: PathBuf,
    /// Block whose output it encodes (0-based).
    #[arg(long)]
    layer: usize,
    /// Number of latents K.
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = 15)]
    latents: usize,
    /// Top-k of the SAE (1..=K).
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = 3)]
    k: usize,
    /// Seed of the random decoder directions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The SAE file to write (safetensors).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct RandomVectorsArgs {
    /// The (base) model the vectors steer.
    #[arg(long)]
    model: PathBuf,
    /// Block at whose output they are added (0-based).
    #[arg(long)]
    layer: usize,
    /// Number of category vectors K.
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = 15)]
    count: usize,
    /// L2 norm of each vector (> 0).
    #[arg(long, default_value_t = 8.0)]
    norm: f32,
    /// Seed of the random directions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The steering-set file to write (safetensors).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
    /// The demo model: a GGUF file (fetched by `bash models/fetch-demo-model.sh`) or a
    /// checkpoint folder. It plays both the base and the thinking model. Default: the fetched
    /// file, in models/ of the working folder or of the checkout this binary was built from.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output folder of every artifact; rerunning with it resumes.
    #[arg(long, default_value = thinksteer::demo::DEFAULT_OUT)]
    out: PathBuf,
    /// A GSM8K-format JSONL file (default: gsm8k_test.jsonl in ../shared/data or /work/shared/data).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// GSM8K questions to generate traces for (the last rows of the test set).
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = thinksteer::demo::DEFAULT_QUESTIONS)]
    questions: usize,
    /// GSM8K problems to evaluate in each mode (the first rows of the test set).
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = thinksteer::demo::DEFAULT_PROBLEMS)]
    problems: usize,
    /// New tokens per trace and per answer.
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = thinksteer::demo::DEFAULT_MAX_NEW_TOKENS)]
    max_new_tokens: usize,
    /// Block of the SAE and of the steering vectors (default: the middle block).
    #[arg(long)]
    layer: Option<usize>,
    /// SAE dictionary size K (one category per latent).
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = thinksteer::demo::DEFAULT_LATENTS)]
    latents: usize,
    /// Seed of the SAE training.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run the generation.
    #[arg(long, value_enum, default_value = "auto")]
    device: thinksteer::eval::cli::EvalDevice,
}

#[derive(Args)]
struct GradeArgs {
    /// gsm8k (final number), or math or math500 (last \boxed{}).
    #[arg(long)]
    kind: String,
    /// The reference answer.
    #[arg(long, allow_hyphen_values = true)]
    reference: String,
    /// The model's response text.
    #[arg(long, allow_hyphen_values = true)]
    response: String,
    /// Print {"extracted", "correct"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// qwen2.5-1.5b, llama-3.1-8b (random weights of the real shape), tiny (a small shape for
    /// checking the code paths, e.g. on the emulated driver) or a checkpoint folder.
    #[arg(long)]
    shape: String,
    /// Where to run (named shapes need the GPU).
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Decode batch sizes.
    #[arg(long, value_parser = thinksteer::cli_args::count, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Prompt length (prefill benchmark and decode context).
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = 64)]
    prompt_len: usize,
    /// Decode steps timed per batch size.
    #[arg(long, value_parser = thinksteer::cli_args::count, default_value_t = 256)]
    new_tokens: usize,
    /// Print JSON rows instead of a table.
    #[arg(long)]
    json: bool,
    /// Time the hybrid step of a pair of this shape against plain decode of both (GPU).
    #[arg(long)]
    hybrid: bool,
    /// With --hybrid: give the thinking model the base model's weights and this share of the
    /// problems a thinking prompt of its own, so that about this share of the steps is steered
    /// (the paper's runs steer about 0.12); without it nearly every step is steered.
    #[arg(long)]
    steered_share: Option<f64>,
    /// With --hybrid: steering windows (e.g. the paper's 0,-1,-15,-50,-100); other than -1,
    /// the host-driven loop on two engines is timed instead of the one-graph step.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "-1",
        allow_hyphen_values = true
    )]
    windows: Vec<i64>,
    /// With --hybrid and window 0: the base engine's window-0 prefix caches (as in `hybrid`;
    /// 0: none, for timing without them).
    #[arg(long)]
    prefix_caches: Option<usize>,
    /// Rows per forward call on the GPU (the prefill chunk; when not given, what the other commands
    /// use: 512, or THINKSTEER_PREFILL_ROWS). Plain decode only.
    #[arg(long, value_parser = thinksteer::cli_args::count)]
    chunk: Option<usize>,
    /// Time the steering-vector loss and gradient of one example of --prompt-len tokens (GPU).
    #[arg(long)]
    vector_grad: bool,
    /// GPU decode: also time each batch with each kind of launch of its step (kernel, grid and a
    /// product's K) left out in turn, printing what each costs inside the replayed step (stderr).
    #[arg(long)]
    marginal: bool,
}

/// The flags, with a negative number taken as a flag's value (`--seed -1`), so that its parser
/// names the flag ("invalid value '-1' for '--seed <SEED>'") instead of clap taking "-1" for an
/// unknown flag ("unexpected argument '-1' found").
fn parse() -> std::result::Result<Cli, clap::Error> {
    let mut cmd = Cli::command().mut_subcommands(|c| c.allow_negative_numbers(true));
    let mut m = cmd.try_get_matches_from_mut(std::env::args_os())?;
    Cli::from_arg_matches_mut(&mut m).map_err(|e| e.format(&mut cmd))
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: clap's own text on stdout.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // `thinksteer` alone: the help, on stderr.
            let _ = e.print();
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{}", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let res = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Logits(a) => cmd_logits(a),
        Cmd::Hybrid(a) => cmd_hybrid(a),
        Cmd::RandomSae(a) => cmd_random_sae(a),
        Cmd::RandomVectors(a) => cmd_random_vectors(a),
        Cmd::Grade(a) => cmd_grade(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Traces(a) => thinksteer::taxonomy::cli::traces(a),
        Cmd::Activations(a) => thinksteer::taxonomy::cli::activations(a),
        Cmd::TrainSae(a) => thinksteer::taxonomy::cli::train_sae(a),
        Cmd::Annotate(a) => thinksteer::taxonomy::cli::annotate(a),
        Cmd::TrainVectors(a) => thinksteer::taxonomy::cli::train_vectors(a),
        Cmd::Eval(a) => thinksteer::eval::cli::eval(a),
        Cmd::Report(a) => thinksteer::eval::cli::report(a),
        Cmd::Convert(a) => cmd_convert(a),
        Cmd::Kernels(a) => cmd_kernels(a),
        Cmd::Demo(a) => cmd_demo(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}

/// A usage error on one line, as every other error: clap's lines joined (after a line ending
/// in ':' with a space, else with "; "), without the closing pointer to --help.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    for l in lines.filter(|l| !l.starts_with("For more information")) {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(l);
    }
    out
}

/// The model, its tokenizer (if any) and the prompt ids.
struct Loaded {
    ckpt: Checkpoint,
    /// Run on the GPU (decided here, from the config: `auto` keeps shapes the kernels do not
    /// take, such as the tiny test checkpoints, on the CPU).
    cuda: bool,
    tok: Option<Tokenizer>,
    prompt_ids: Vec<u32>,
}

fn load(a: &PromptArgs) -> Result<Loaded> {
    let ckpt = Checkpoint::open(&a.model)?;
    let auto_cpu = a.device == Device::Auto && !thinksteer::cuda::model::supports(&ckpt.config);
    let cuda = use_cuda(a.device)? && !auto_cpu;
    let tok = Tokenizer::from_dir(&a.model)?;
    let prompt_ids = match (&a.prompt, &a.prompt_ids) {
        (_, Some(ids)) if a.chat => {
            return Err(anyhow!(
                "--chat needs --prompt TEXT, found --prompt-ids {ids:?}"
            ))
        }
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let tok = tok.as_ref().ok_or_else(|| {
                anyhow!(
                    "{}: no tokenizer.json, so --prompt TEXT cannot be encoded; pass --prompt-ids",
                    a.model.display()
                )
            })?;
            if a.chat {
                tok.encode(&render_chat(&a.model, text)?)?
            } else {
                tok.encode_plain(text)?
            }
        }
        (None, None) => return Err(anyhow!("expected --prompt or --prompt-ids")),
    };
    if prompt_ids.is_empty() {
        return Err(anyhow!("the prompt is empty: expected at least one token"));
    }
    ckpt.config
        .check_ids(&prompt_ids)
        .map_err(|e| anyhow!("the prompt: {e}"))?;
    let ctx = ckpt.config.max_position_embeddings;
    if prompt_ids.len() >= ctx {
        return Err(anyhow!(
            "the prompt has {} tokens: expected fewer than the model's context of {ctx} (max_position_embeddings)",
            prompt_ids.len()
        ));
    }
    Ok(Loaded {
        ckpt,
        cuda,
        tok,
        prompt_ids,
    })
}

fn render_chat(dir: &Path, text: &str) -> Result<String> {
    let tpl = ChatTemplate::from_dir(dir)?
        .ok_or_else(|| anyhow!("{}: --chat needs a chat template (tokenizer_config.json or chat_template.jinja), found none", dir.display()))?;
    Ok(tpl.render(&[Message::user(text)], true)?)
}

/// Whether to run on the GPU: `cuda` insists (with the reason when it cannot), `auto` falls back.
fn use_cuda(d: Device) -> Result<bool> {
    match d {
        Device::Cpu => Ok(false),
        Device::Auto => Ok(thinksteer::cuda::available().is_ok()),
        Device::Cuda => match thinksteer::cuda::available() {
            Ok(()) => Ok(true),
            Err(why) => Err(anyhow!("--device cuda: {why}")),
        },
    }
}

fn cmd_generate(mut a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    a.prompt.model = thinksteer::gguf::checkpoint_dir(&a.prompt.model)?;
    let mut l = load(&a.prompt)?;
    let ctx = l
        .ckpt
        .config
        .max_position_embeddings
        .min(l.prompt_ids.len() + a.max_new_tokens);
    let mut engine = l.ckpt.decoder(1, ctx, l.cuda)?;
    let params = GenParams {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_strings: a.stop.clone(),
        eos_ids: l.ckpt.config.eos_token_ids.clone(),
    };
    let stream = !a.json && l.tok.is_some();
    let mut stdout = std::io::stdout();
    let out = generate(
        engine.as_mut(),
        l.tok.as_ref(),
        std::slice::from_ref(&l.prompt_ids),
        &params,
        |_, piece| {
            if stream {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
        },
    )?;
    let g = &out[0];
    if g.finish == thinksteer::generate::Finish::Context {
        eprintln!(
            "note: stopped at the model's context of {ctx} positions, after {} of --max-new-tokens {}",
            g.ids.len(),
            a.max_new_tokens
        );
    }
    if a.json {
        let j = serde_json::json!({ "prompt_ids": g.prompt_ids, "ids": g.ids, "text": g.text });
        println!("{j}");
    } else if stream {
        println!();
    } else {
        let ids: Vec<String> = g.ids.iter().map(|i| i.to_string()).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}

fn cmd_logits(mut a: LogitsArgs) -> Result<()> {
    // Before the forward pass, whose [T, V] logits would only then find nowhere to go.
    if a.out.is_dir() {
        return Err(anyhow!(
            "--out {}: expected a safetensors file, found a folder",
            a.out.display()
        ));
    }
    a.prompt.model = thinksteer::gguf::checkpoint_dir(&a.prompt.model)?;
    let mut l = load(&a.prompt)?;
    let c = l.ckpt.config.clone();
    for (i, &layer) in a.capture_layer.iter().enumerate() {
        if layer >= c.num_hidden_layers {
            return Err(anyhow!(
                "--capture-layer {layer}: expected a block index below num_hidden_layers {}",
                c.num_hidden_layers
            ));
        }
        if a.capture_layer[..i].contains(&layer) {
            return Err(anyhow!(
                "--capture-layer {layer}: expected each block once, found it twice"
            ));
        }
    }
    let t = l.prompt_ids.len();
    let mut engine = l.ckpt.decoder(1, t, l.cuda)?;
    let slots = vec![0; t];
    let positions: Vec<usize> = (0..t).collect();
    let rows: Vec<usize> = (0..t).collect();
    let mut hooks = Hooks {
        capture: a
            .capture_layer
            .iter()
            .map(|&l| (l + 1, Vec::new()))
            .collect(),
        steer: None,
    };
    let step = Step {
        slots: &slots,
        positions: &positions,
        n_write: t,
        run_start: &[],
    };
    let logits = engine
        .forward(&l.prompt_ids, &step, &rows, &mut hooks)?
        .to_vec();
    let (d, v) = (c.hidden_size, c.vocab_size);
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = vec![(
        "logits".into(),
        bytemuck::cast_slice(&logits).to_vec(),
        vec![t, v],
    )];
    for (point, buf) in &hooks.capture {
        tensors.push((
            format!("resid.{}", point - 1),
            bytemuck::cast_slice(buf).to_vec(),
            vec![t, d],
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, b, s)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    // Streamed into the file: [T, V] logits of a long prompt are gigabytes.
    Ok(thinksteer::files::write_atomic_with(&a.out, |tmp| {
        safetensors::serialize_to_file(views, None, tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => e,
            e => std::io::Error::other(e),
        })
    })?)
}

fn cmd_hybrid(mut a: HybridArgs) -> Result<()> {
    a.base = thinksteer::gguf::checkpoint_dir(&a.base)?;
    a.thinking = thinksteer::gguf::checkpoint_dir(&a.thinking)?;
    use thinksteer::hybrid::{check_prompts, run, Artifacts, Pair, Prompts, Settings};
    use thinksteer::sae::Sae;
    // The GPU covers the cached and persistent modes (exact mode recomputes on the CPU).
    let gpu_ok = a.mode != thinksteer::hybrid::Mode::Exact;
    let on_gpu = match a.device {
        Device::Cuda if !gpu_ok => {
            return Err(anyhow!(
                "--device cuda: --mode exact runs on the CPU; use --device cpu"
            ))
        }
        d => use_cuda(d)? && gpu_ok,
    };
    let mut settings = Settings {
        mode: a.mode,
        coefficients: a.coefficients.clone(),
        windows: a.windows.clone(),
        max_new_tokens: a.max_new_tokens,
        batch: a.batch,
        prefix_caches: a.prefix_caches,
        thinking_gpu: a.thinking_gpu,
        ..Settings::default()
    };
    a.ablations.apply(&mut settings);
    // The flags alone, before any model is loaded.
    settings.validate(&[])?;
    if a.question.as_deref().is_some_and(|q| q.trim().is_empty()) {
        return Err(anyhow!(
            "--question: expected a question, found an empty string"
        ));
    }
    // Configs now; the f32 CPU weights only for a CPU run.
    let mut base = Checkpoint::open(&a.base)?;
    let mut thinking = Checkpoint::open(&a.thinking)?;
    // `auto` stays on the CPU for shapes the kernels do not take (the tiny test checkpoints).
    let fits = |c| thinksteer::cuda::model::supports(c);
    let on_gpu =
        on_gpu && (a.device == Device::Cuda || (fits(&base.config) && fits(&thinking.config)));
    if let Some(n) = a.thinking_gpu {
        thinksteer::hybrid::check_thinking_gpu(n, on_gpu)?;
    }
    let sae = Sae::load(&a.sae)?;
    let steering = a.ablations.load_steering(&a.vectors)?;
    let prompts = thinksteer::eval::run::PromptBuilder::load(
        &a.base,
        &a.thinking,
        a.thinking_plain,
        a.base_prompt.clone(),
    )?;
    let base_tok = &prompts.base_tok;
    base_tok.check_same_ids(&prompts.think_tok)?;
    let questions = match (&a.question, &a.questions) {
        (Some(q), _) => vec![q.clone()],
        (None, Some(p)) => {
            let mut qs = thinksteer::eval::dataset::load_questions(p, a.question_field.as_deref())?;
            qs.truncate(a.limit.unwrap_or(usize::MAX));
            qs
        }
        (None, None) => return Err(anyhow!("expected --question or --questions")),
    };
    let problems = questions
        .iter()
        .map(|q| prompts.hybrid(q))
        .collect::<thinksteer::Result<Vec<Prompts>>>()?;
    let art = Artifacts {
        sae: &sae,
        steering: &steering,
    };
    art.validate_for(&base.config, &thinking.config)?;
    settings.validate(&problems)?;
    check_prompts(&base.config, &thinking.config, &problems, |i| i)?;
    let eos = base.config.eos_token_ids.clone();
    let batch = if a.mode == thinksteer::hybrid::Mode::Exact {
        1
    } else {
        a.batch.max(1)
    };
    let mut gpu_hybrid = if on_gpu {
        let longest = |f: fn(&Prompts) -> usize| problems.iter().map(f).max().unwrap_or(1);
        let ctx_b = base
            .config
            .max_position_embeddings
            .min(longest(|p| p.base.len()) + a.max_new_tokens + 1);
        let ctx_t = thinking
            .config
            .max_position_embeddings
            .min(longest(|p| p.thinking.len()) + a.max_new_tokens + 1);
        Some(thinksteer::cuda::hybrid::GpuHybrid::load(
            &a.base,
            &a.thinking,
            &sae,
            &steering,
            &settings,
            batch,
            ctx_b,
            ctx_t,
        )?)
    } else {
        None
    };
    // All questions at once: `batch` decode together, a finished one's slot takes the next.
    // Each question is printed the moment it stops (so in the order they finish; `index` says
    // which), the ones the context stopped at the end.
    thinksteer::hybrid::hand_over_as_they_finish(
        problems.len(),
        &eos,
        a.max_new_tokens,
        |on_step| match gpu_hybrid.as_mut() {
            Some(h) => h.run(art, &problems, &settings, on_step),
            None => {
                let (b, t) = (base.cpu_model()?, thinking.cpu_model()?);
                let pair = Pair {
                    base: &b,
                    thinking: &t,
                    sae: &sae,
                    steering: &steering,
                };
                run(&pair, &problems, &settings, on_step)
            }
        },
        |j, out| print_hybrid(j, &questions[j], out, &sae, base_tok, &eos, a.json),
    )
}

/// One finished question of `hybrid`: a JSON line, or a header and the text.
fn print_hybrid(
    index: usize,
    question: &str,
    out: &thinksteer::hybrid::Output,
    sae: &thinksteer::sae::Sae,
    tok: &Tokenizer,
    eos: &[u32],
    json: bool,
) -> Result<()> {
    let body: Vec<u32> = out
        .ids
        .iter()
        .copied()
        .filter(|i| !eos.contains(i))
        .collect();
    let text = tok.decode(&body)?;
    let mut stdout = std::io::stdout().lock();
    if json {
        // Serialised from typed values (not a `json!` tree) so f32 coefficients print in their
        // shortest form (0.1, not 0.10000000149011612).
        #[derive(serde::Serialize)]
        struct Stats {
            steered_fraction: f64,
            category_counts: Vec<usize>,
        }
        #[derive(serde::Serialize)]
        struct Line<'a> {
            index: usize,
            question: &'a str,
            ids: &'a [u32],
            text: &'a str,
            steps: &'a [thinksteer::hybrid::StepRecord],
            stats: Stats,
        }
        let line = Line {
            index,
            question,
            ids: &out.ids,
            text: &text,
            steps: &out.steps,
            stats: Stats {
                steered_fraction: out.steered_fraction(),
                category_counts: out.category_counts(sae.latents),
            },
        };
        writeln!(stdout, "{}", serde_json::to_string(&line)?)?;
    } else {
        writeln!(
            stdout,
            "=== question {index} (steered {:.1}% of {} tokens)\n{text}",
            100.0 * out.steered_fraction(),
            out.ids.len()
        )?;
    }
    stdout.flush()?;
    Ok(())
}

fn cmd_random_sae(mut a: RandomSaeArgs) -> Result<()> {
    if a.latents == 0 || a.k == 0 || a.k > a.latents {
        return Err(anyhow!(
            "expected --latents >= 1 and 1 <= --k <= --latents, found --latents {} --k {}",
            a.latents,
            a.k
        ));
    }
    a.model = thinksteer::gguf::checkpoint_dir(&a.model)?;
    // The config as every command reads it: checked against the weight files (not loaded).
    let c = Checkpoint::open(&a.model)?.config;
    // W_enc and W_dec in f32, and the file's bytes as they are written.
    let bytes = a.latents.saturating_mul(c.hidden_size).saturating_mul(16);
    thinksteer::memory::check_fits(bytes, &format!("--latents {}", a.latents))?;
    let sae = thinksteer::sae::Sae::random(
        c.hidden_size,
        a.latents,
        a.layer,
        a.k,
        a.seed,
        &a.model.display().to_string(),
    );
    sae.validate_for(c.hidden_size, c.num_hidden_layers)?;
    sae.save(&a.out)?;
    Ok(())
}

fn cmd_random_vectors(mut a: RandomVectorsArgs) -> Result<()> {
    if !(a.norm.is_finite() && a.norm > 0.0) {
        return Err(anyhow!(
            "--norm: expected a finite number > 0, found {}",
            a.norm
        ));
    }
    a.model = thinksteer::gguf::checkpoint_dir(&a.model)?;
    // The config as every command reads it: checked against the weight files (not loaded).
    let c = Checkpoint::open(&a.model)?.config;
    // The vectors in f32, and the file's bytes as they are written.
    let bytes = a.count.saturating_mul(c.hidden_size).saturating_mul(8);
    thinksteer::memory::check_fits(bytes, &format!("--count {}", a.count))?;
    let set = thinksteer::steering::SteeringSet::random(
        c.hidden_size,
        a.count,
        a.layer,
        a.norm,
        a.seed,
        &a.model.display().to_string(),
    );
    set.validate_for(c.hidden_size, c.num_hidden_layers)?;
    set.save(&a.out)?;
    Ok(())
}

fn cmd_demo(a: DemoArgs) -> Result<()> {
    let fetched = Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = match a.model {
        Some(m) => m,
        // The working folder's, else the checkout's (a binary run from elsewhere).
        None => [
            fetched.to_path_buf(),
            Path::new(env!("CARGO_MANIFEST_DIR")).join(fetched),
        ]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or(fetched.to_path_buf()),
    };
    if !model.exists() {
        return Err(anyhow!(
            "{}: expected the demo model, found no such file; fetch it with `bash models/fetch-demo-model.sh` (98 MB) or pass --model",
            model.display()
        ));
    }
    let dir = thinksteer::gguf::checkpoint_dir(&model)?;
    let o = thinksteer::demo::DemoOptions {
        out: a.out,
        dataset: a.dataset,
        questions: a.questions,
        problems: a.problems,
        max_new_tokens: a.max_new_tokens,
        layer: a.layer,
        latents: a.latents,
        seed: a.seed,
        device: a.device,
        ..Default::default()
    };
    let summary = thinksteer::demo::run(&dir, &o)?;
    print!("{}", summary.render());
    Ok(())
}

fn cmd_grade(a: GradeArgs) -> Result<()> {
    use thinksteer::eval::grade::{extract_gsm8k, grade, GradeKind};
    let kind: GradeKind = a.kind.parse()?;
    let no_number = kind == GradeKind::Gsm8k && extract_gsm8k(&a.reference).is_none();
    if a.reference.trim().is_empty() || no_number {
        return Err(anyhow!(
            "--reference: expected {}, found {:?}",
            if no_number {
                "a number (or GSM8K's `#### N`)"
            } else {
                "an answer"
            },
            a.reference
        ));
    }
    let g = grade(kind, &a.reference, &a.response);
    if a.json {
        println!("{}", serde_json::to_string(&g)?);
    } else {
        let verdict = if g.correct { "correct" } else { "incorrect" };
        match &g.extracted {
            Some(x) => println!("{verdict} (extracted {x})"),
            None => println!("{verdict} (no answer found)"),
        }
    }
    Ok(())
}

fn cmd_bench(mut a: BenchArgs) -> Result<()> {
    // A GGUF file becomes its converted folder; shape names and folders pass through unchanged.
    a.shape = (thinksteer::gguf::checkpoint_dir(Path::new(&a.shape))?)
        .to_string_lossy()
        .into_owned();
    let s = thinksteer::bench::Settings {
        batches: a.batch.clone(),
        prompt_len: a.prompt_len,
        new_tokens: a.new_tokens,
        seed: 0,
        steered_share: a.steered_share,
        windows: a.windows.clone(),
        prefix_caches: a.prefix_caches,
        chunk: a.chunk.unwrap_or_else(call_rows).max(1),
        marginal: a.marginal,
    };
    if let Some(f) = a.steered_share {
        if !(0.0..=1.0).contains(&f) || !a.hybrid {
            return Err(anyhow!(
                "--steered-share goes with --hybrid and must be in [0, 1], found {f}{}",
                if a.hybrid { "" } else { " without --hybrid" }
            ));
        }
    }
    if a.prefix_caches.is_some_and(|n| n > 0) && !(a.hybrid && a.windows.contains(&0)) {
        return Err(anyhow!(
            "--prefix-caches goes with --hybrid and window 0, found windows {:?}{}",
            a.windows,
            if a.hybrid { "" } else { " without --hybrid" }
        ));
    }
    if a.windows != [-1] && !a.hybrid {
        return Err(anyhow!(
            "--windows goes with --hybrid, found {:?} without it",
            a.windows
        ));
    }
    if a.chunk.is_some() && (a.hybrid || a.vector_grad) {
        return Err(anyhow!(
            "--chunk sets the rows per call of plain prefill and decode: it does not go with --hybrid or --vector-grad"
        ));
    }
    if a.hybrid && a.vector_grad {
        return Err(anyhow!(
            "--hybrid and --vector-grad are two benchmarks: expected one of them, found both"
        ));
    }
    if a.marginal && a.vector_grad {
        return Err(anyhow!(
            "--marginal times the launches of decode or hybrid steps: it does not go with --vector-grad"
        ));
    }
    // A named shape's context from the flags alone, before the device is chosen (a folder's
    // is checked as its config is read).
    if let Some(c) = thinksteer::bench::named_shape(&a.shape) {
        let decoded = if a.vector_grad { 0 } else { a.new_tokens };
        thinksteer::bench::check_context(&c, a.prompt_len, decoded)?;
    }
    if a.vector_grad {
        if !use_cuda(a.device)? {
            return Err(anyhow!(
                "--vector-grad benchmarks the GPU gradient: it needs --device cuda and a GPU"
            ));
        }
        for r in thinksteer::bench::run_cuda_vector_grad(&a.shape, a.prompt_len, 0)? {
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} vector-grad: {} tokens, targets {} ({} targets, {} active rows, block {}): {:.1} ms/example; 2,048 examples x 50 epochs = {:.2} h",
                    r.shape, r.prompt_len, r.targets_at, r.targets, r.active_rows, r.layer, r.ms_per_example, r.projected_hours
                );
                println!("  loss alone (forward): {:.1} ms/example", r.ms_forward);
                for (kernel, n, ms) in &r.profile {
                    println!("  profile {kernel:<22} {n:>5} launches {ms:>9.2} ms");
                }
            }
        }
        return Ok(());
    }
    let rows = if a.hybrid {
        if !use_cuda(a.device)? {
            return Err(anyhow!(
                "--hybrid benchmarks the GPU step: it needs --device cuda and a GPU"
            ));
        }
        thinksteer::bench::run_cuda_hybrid(&a.shape, &s)?
    } else if use_cuda(a.device)? {
        thinksteer::bench::run_cuda(&a.shape, &s)?
    } else if a.marginal {
        return Err(anyhow!(
            "--marginal times the launches of GPU decode steps: it needs --device cuda and a GPU"
        ));
    } else {
        thinksteer::bench::run_cpu(&a.shape, &s)?
    };
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<14} {:<6} {:<8} {:>6} {:>12} {:>10} {:>10} {:>9}",
            "shape", "device", "phase", "batch", "ms/token", "tok/s", "GB/s", "% floor"
        );
        for r in &rows {
            let pct = match (r.phase, r.pct_of_floor.is_finite()) {
                (_, false) => "-".to_string(), // a prefill on a card of unknown peak
                ("prefill", true) => format!("{:.1}%TC", r.pct_of_floor),
                _ => format!("{:.1}%", r.pct_of_floor),
            };
            println!(
                "{:<14} {:<6} {:<8} {:>6} {:>12.3} {:>10.1} {:>10.0} {:>9}",
                r.shape
                    .chars()
                    .rev()
                    .take(14)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<String>(),
                r.device,
                r.phase,
                r.batch,
                r.ms_per_token,
                r.tok_per_s,
                r.gb_per_s,
                pct
            );
            if let (Some(x), Some(f)) = (r.ratio_to_plain, r.steered_fraction) {
                println!(
                    "{:<14} x{x:.3} of the two plain decode steps, {:.1}% of steps steered",
                    "",
                    100.0 * f
                );
            }
        }
    }
    Ok(())
}

fn cmd_kernels(a: KernelsArgs) -> Result<()> {
    use thinksteer::cuda::sources;
    let dir = a.cache.or_else(sources::cache_dir).ok_or_else(|| {
        anyhow!("no kernel cache folder: THINKSTEER_KERNEL_CACHE is off and --cache is not given")
    })?;
    if let Some(&bad) = a.arch.iter().find(|&&c| !(80..=200).contains(&c)) {
        return Err(anyhow!(
            "--arch: expected compute capabilities ×10 from 80 to 200 (e.g. 80,90), found {bad}"
        ));
    }
    // A file where the folder goes would fail only at the first write, after the compile.
    if let Some(file) = dir.ancestors().find(|p| p.exists() && !p.is_dir()) {
        let at = if file == dir {
            String::new()
        } else {
            format!(" at {}", file.display())
        };
        return Err(anyhow!(
            "kernel cache {}: expected a folder, found a file{at}",
            dir.display()
        ));
    }
    sources::nvrtc_available().map_err(|e| anyhow!(e))?;
    for &cc in &a.arch {
        let (mut compiled, mut cached, mut bytes) = (0, 0, 0);
        // The modules side by side, as the engine compiles them.
        let results = sources::per_module(|stem| sources::cubin(stem, cc, Some(&dir)));
        for r in results {
            let (bin, origin) = r.map_err(|e| anyhow!(e))?;
            bytes += bin.len();
            match origin {
                sources::Origin::Compiled => compiled += 1,
                sources::Origin::Cache | sources::Origin::Embedded => cached += 1,
            }
        }
        println!(
            "sm_{cc}: {} modules ({compiled} compiled, {cached} already cached), {:.1} MB in {}",
            compiled + cached,
            bytes as f64 / 1e6,
            dir.display()
        );
    }
    if let Some(cc) = a
        .arch
        .iter()
        .find(|&&cc| !sources::cache_complete(&dir, cc))
    {
        return Err(anyhow!(
            "{} does not hold every module for sm_{cc} after compiling (is it writable?)",
            dir.display()
        ));
    }
    Ok(())
}

fn cmd_convert(a: ConvertArgs) -> Result<()> {
    let r = thinksteer::gguf::convert(&a.gguf, &a.out)?;
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "{}: {} model, {} tensors ({}) dequantised to {} f32 parameters; tokenizer {}, chat template {}",
        r.out.display(),
        r.arch,
        r.tensors,
        types.join(", "),
        r.params,
        if r.tokenizer { "written" } else { "absent" },
        if r.chat_template { "written" } else { "absent" }
    );
    Ok(())
}
