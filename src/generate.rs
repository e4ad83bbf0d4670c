//! Batched generation: prefill every prompt in one forward call, then one decode step per token
//! for all unfinished rows. Stops on any eos id, a stop string, max new tokens or the context.

use crate::engine::Decoder;
use crate::model::{Hooks, Step};
use crate::sampling::{Sampler, SamplingParams, StopChecker};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{bail, Result};

#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    pub eos_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    StopString,
    MaxNewTokens,
    Context,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub prompt_ids: Vec<u32>,
    /// New tokens, including the eos id when generation stopped on one.
    pub ids: Vec<u32>,
    /// Decoded new tokens without the eos and cut before a stop string (empty without a tokenizer).
    pub text: String,
    pub finish: Finish,
}

struct Row<'t> {
    pos: usize, // position of the next token to feed
    sampler: Sampler,
    stream: Option<StreamDecoder<'t>>,
    text: String,
    emitted: usize, // bytes of `text` already handed to the callback
    out: Generated,
    done: bool,
}

/// Generates a continuation for each prompt (one cache slot per prompt). `on_text(row, piece)`
/// receives text as it is produced.
pub fn generate(
    dec: &mut dyn Decoder,
    tok: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    p: &GenParams,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generated>> {
    if prompts.len() > dec.slots() {
        bail!(
            "{} prompts but the engine has {} cache slots",
            prompts.len(),
            dec.slots()
        );
    }
    let ctx = dec.max_len();
    for (i, pr) in prompts.iter().enumerate() {
        if pr.is_empty() {
            bail!("prompt {i} is empty: expected at least one token");
        }
        if pr.len() >= ctx {
            bail!(
                "prompt {i} has {} tokens: expected fewer than the context of {ctx}",
                pr.len()
            );
        }
    }
    let stops = StopChecker::new(&p.stop_strings);
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(i, pr)| Row {
            pos: pr.len(),
            sampler: Sampler::new(SamplingParams {
                seed: p.sampling.seed.wrapping_add(i as u64),
                ..p.sampling
            }),
            stream: tok.map(|t| t.stream_decoder()),
            text: String::new(),
            emitted: 0,
            out: Generated {
                prompt_ids: pr.clone(),
                ids: vec![],
                text: String::new(),
                finish: Finish::MaxNewTokens,
            },
            done: p.max_new_tokens == 0,
        })
        .collect();

    // Prefill: every prompt in one call, logits at each prompt's last token.
    let mut ids: Vec<u32> = prompts.concat();
    let mut slots: Vec<usize> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, pr)| vec![i; pr.len()])
        .collect();
    let mut positions: Vec<usize> = prompts.iter().flat_map(|pr| 0..pr.len()).collect();
    let mut last: Vec<usize> = prompts
        .iter()
        .scan(0, |acc, pr| {
            *acc += pr.len();
            Some(*acc - 1)
        })
        .collect();
    let mut active: Vec<usize> = (0..rows.len()).filter(|&i| !rows[i].done).collect();
    while !active.is_empty() {
        let step = Step {
            slots: &slots,
            positions: &positions,
            n_write: ids.len(),
        };
        let v = dec.config().vocab_size;
        let logits = dec.forward(&ids, &step, &last, &mut Hooks::default())?;
        for (k, &r) in active.iter().enumerate() {
            let id = rows[r].sampler.sample(&logits[k * v..(k + 1) * v]);
            push_token(&mut rows[r], r, id, p, &stops, ctx, &mut on_text)?;
        }
        active.retain(|&r| !rows[r].done);
        ids.clear();
        slots.clear();
        positions.clear();
        last.clear();
        for &r in &active {
            ids.push(*rows[r].out.ids.last().expect("a decoding row has a token"));
            slots.push(r);
            positions.push(rows[r].pos);
            last.push(last.len());
            rows[r].pos += 1;
        }
    }
    for (r, row) in rows.iter_mut().enumerate() {
        if let Some(s) = row.stream.as_mut() {
            let rest = s.finish()?;
            row.text.push_str(&rest);
        }
        let text = match stops.truncate(&row.text) {
            Some(t) if row.out.finish == Finish::StopString => t.to_string(),
            _ => row.text.clone(),
        };
        if text.len() > row.emitted {
            on_text(r, &text[row.emitted..]);
        }
        row.out.text = text;
    }
    Ok(rows.into_iter().map(|r| r.out).collect())
}

fn push_token(
    row: &mut Row,
    r: usize,
    id: u32,
    p: &GenParams,
    stops: &StopChecker,
    ctx: usize,
    on_text: &mut impl FnMut(usize, &str),
) -> Result<()> {
    row.out.ids.push(id);
    if p.eos_ids.contains(&id) {
        row.out.finish = Finish::Eos;
        row.done = true;
        return Ok(());
    }
    if let Some(s) = row.stream.as_mut() {
        let piece = s.push(id)?;
        row.text.push_str(&piece);
        if !stops.is_empty() && stops.find(&row.text).is_some() {
            row.out.finish = Finish::StopString;
            row.done = true;
            return Ok(());
        }
        // Hold back text that could be the start of a stop string.
        let safe = row.text.len() - stops.holdback(&row.text);
        if safe > row.emitted {
            on_text(r, &row.text[row.emitted..safe]);
            row.emitted = safe;
        }
    }
    if row.out.ids.len() >= p.max_new_tokens {
        row.out.finish = Finish::MaxNewTokens;
        row.done = true;
    } else if row.pos >= ctx {
        row.out.finish = Finish::Context;
        row.done = true;
    }
    Ok(())
}
