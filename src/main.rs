//! The `thinksteer` command line. Every failure prints one line and exits with code 2.

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use thinksteer::chat::{ChatTemplate, Message};
use thinksteer::engine::{CpuEngine, Decoder};
use thinksteer::generate::{generate, GenParams};
use thinksteer::model::{Hooks, Model, Step};
use thinksteer::sampling::SamplingParams;
use thinksteer::tokenizer::Tokenizer;

#[derive(Parser)]
#[command(name = "thinksteer", version, about = "A transformer runtime for SAE-gated hybrid reasoning")]
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
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Device {
    Cpu,
    Cuda,
    /// CUDA when a GPU is usable, else the CPU.
    Auto,
}

#[derive(Args)]
struct PromptArgs {
    /// Checkpoint folder (config.json, model.safetensors or sharded index, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs tokenizer.json in the model folder).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
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
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass; 1 disables it.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Logits(a) => cmd_logits(a),
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

/// The model, its tokenizer (if any) and the prompt ids.
struct Loaded {
    model: Arc<Model>,
    tok: Option<Tokenizer>,
    prompt_ids: Vec<u32>,
}

fn load(a: &PromptArgs) -> Result<Loaded> {
    check_device(a.device)?;
    let model = Arc::new(Model::load(&a.model)?);
    let tok = Tokenizer::from_dir(&a.model)?;
    let prompt_ids = match (&a.prompt, &a.prompt_ids) {
        (_, Some(ids)) if a.chat => return Err(anyhow!("--chat needs --prompt TEXT, found --prompt-ids {ids:?}")),
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let tok = tok.as_ref().ok_or_else(|| {
                anyhow!("{}: no tokenizer.json, so --prompt TEXT cannot be encoded; pass --prompt-ids", a.model.display())
            })?;
            let text = if a.chat { render_chat(&a.model, text)? } else { text.clone() };
            tok.encode(&text)?
        }
        (None, None) => return Err(anyhow!("expected --prompt or --prompt-ids")),
    };
    if prompt_ids.is_empty() {
        return Err(anyhow!("the prompt is empty: expected at least one token"));
    }
    let v = model.config.vocab_size;
    if let Some(bad) = prompt_ids.iter().find(|&&i| i as usize >= v) {
        return Err(anyhow!("prompt token id {bad} is outside the vocabulary: expected ids below vocab_size {v}"));
    }
    let ctx = model.config.max_position_embeddings;
    if prompt_ids.len() >= ctx {
        return Err(anyhow!(
            "the prompt has {} tokens: expected fewer than the model's context of {ctx} (max_position_embeddings)",
            prompt_ids.len()
        ));
    }
    Ok(Loaded { model, tok, prompt_ids })
}

fn render_chat(dir: &Path, text: &str) -> Result<String> {
    let tpl = ChatTemplate::from_dir(dir)?
        .ok_or_else(|| anyhow!("{}: --chat needs a chat template (tokenizer_config.json or chat_template.jinja), found none", dir.display()))?;
    Ok(tpl.render(&[Message::user(text)], true)?)
}

fn check_device(d: Device) -> Result<()> {
    match d {
        Device::Cpu | Device::Auto => Ok(()),
        Device::Cuda => Err(anyhow!("--device cuda: the CUDA engine is not wired into this command yet; use --device cpu")),
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let l = load(&a.prompt)?;
    let ctx = l.model.config.max_position_embeddings.min(l.prompt_ids.len() + a.max_new_tokens);
    let mut engine = CpuEngine::new(l.model.clone(), 1, ctx);
    let params = GenParams {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        stop_strings: a.stop.clone(),
        eos_ids: l.model.config.eos_token_ids.clone(),
    };
    let stream = !a.json && l.tok.is_some();
    let mut stdout = std::io::stdout();
    let out = generate(&mut engine, l.tok.as_ref(), std::slice::from_ref(&l.prompt_ids), &params, |_, piece| {
        if stream {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    let g = &out[0];
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

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let l = load(&a.prompt)?;
    let c = &l.model.config;
    for &layer in &a.capture_layer {
        if layer >= c.num_hidden_layers {
            return Err(anyhow!(
                "--capture-layer {layer}: expected a block index below num_hidden_layers {}",
                c.num_hidden_layers
            ));
        }
    }
    let t = l.prompt_ids.len();
    let mut engine = CpuEngine::new(l.model.clone(), 1, t);
    let slots = vec![0; t];
    let positions: Vec<usize> = (0..t).collect();
    let rows: Vec<usize> = (0..t).collect();
    let mut hooks = Hooks { capture: a.capture_layer.iter().map(|&l| (l + 1, Vec::new())).collect(), steer: None };
    let step = Step { slots: &slots, positions: &positions, n_write: t };
    let logits = engine.forward(&l.prompt_ids, &step, &rows, &mut hooks)?.to_vec();
    let (d, v) = (c.hidden_size, c.vocab_size);
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = vec![("logits".into(), bytemuck::cast_slice(&logits).to_vec(), vec![t, v])];
    for (point, buf) in &hooks.capture {
        tensors.push((format!("resid.{}", point - 1), bytemuck::cast_slice(buf).to_vec(), vec![t, d]));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    Ok(())
}
