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

impl GenParams {
    /// Greedy decoding with no stop strings: what every experiment in the spec uses.
    pub fn greedy(max_new_tokens: usize, eos_ids: Vec<u32>) -> GenParams {
        GenParams {
            max_new_tokens,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            eos_ids,
        }
    }
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

/// Generates a continuation for each prompt. `on_text(row, piece)` receives text as it is
/// produced. The decoder's slots hold one prompt each; a finished row's slot takes the next
/// prompt, so any number of prompts decode `dec.slots()` at a time.
pub fn generate(
    dec: &mut dyn Decoder,
    tok: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    p: &GenParams,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generated>> {
    generate_each(dec, tok, prompts, p, on_text, |_, _| Ok(()))
}

/// `generate`, calling `on_done(row, output)` the moment each row finishes (results can be
/// written as they come).
pub fn generate_each(
    dec: &mut dyn Decoder,
    tok: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    p: &GenParams,
    mut on_text: impl FnMut(usize, &str),
    mut on_done: impl FnMut(usize, &Generated) -> Result<()>,
) -> Result<Vec<Generated>> {
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
    let nslots = dec.slots().min(prompts.len());
    if nslots == 0 && !prompts.is_empty() {
        bail!("the engine has no cache slots");
    }
    let stops = StopChecker::new(&p.stop_strings);
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(i, pr)| Row {
            pos: 0,
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
    if p.max_new_tokens == 0 {
        for (r, row) in rows.iter_mut().enumerate() {
            finish_row(row, r, &stops, &mut on_text)?;
            on_done(r, &row.out)?;
        }
        return Ok(rows.into_iter().map(|r| r.out).collect());
    }
    let mut queue = 0..rows.len();
    let mut who: Vec<Option<usize>> = (0..nslots).map(|_| queue.next()).collect();
    let (mut ids, mut slots, mut positions, mut last) = (vec![], vec![], vec![], vec![]);
    let v = dec.config().vocab_size;
    loop {
        // One step: a newly seated row feeds its whole prompt, the others their last token.
        ids.clear();
        slots.clear();
        positions.clear();
        last.clear();
        let active: Vec<(usize, usize)> = who
            .iter()
            .enumerate()
            .filter_map(|(s, r)| r.map(|r| (s, r)))
            .collect();
        if active.is_empty() {
            break;
        }
        for &(slot, r) in &active {
            let row = &mut rows[r];
            if row.out.ids.is_empty() {
                ids.extend_from_slice(&row.out.prompt_ids);
                slots.extend(std::iter::repeat_n(slot, row.out.prompt_ids.len()));
                positions.extend(0..row.out.prompt_ids.len());
                row.pos = row.out.prompt_ids.len();
            } else {
                ids.push(*row.out.ids.last().expect("a decoding row has a token"));
                slots.push(slot);
                positions.push(row.pos);
                row.pos += 1;
            }
            last.push(ids.len() - 1);
        }
        let step = Step {
            slots: &slots,
            positions: &positions,
            n_write: ids.len(),
            run_start: &[],
        };
        let logits = dec.forward(&ids, &step, &last, &mut Hooks::default())?;
        // A failing `on_done` stops the generation after this step: the other rows finished
        // in it are still handed over (their answers are not lost), then its first error returns.
        let mut failed = None;
        for (k, &(slot, r)) in active.iter().enumerate() {
            let id = rows[r].sampler.sample(&logits[k * v..(k + 1) * v]);
            push_token(&mut rows[r], r, id, p, &stops, ctx, &mut on_text)?;
            if rows[r].done {
                finish_row(&mut rows[r], r, &stops, &mut on_text)?;
                if let Err(e) = on_done(r, &rows[r].out) {
                    failed.get_or_insert(e);
                }
                who[slot] = queue.next();
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(rows.into_iter().map(|r| r.out).collect())
}

/// Flushes a finished row's text: the streamed remainder, cut before a stop string.
fn finish_row(
    row: &mut Row,
    r: usize,
    stops: &StopChecker,
    on_text: &mut impl FnMut(usize, &str),
) -> Result<()> {
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
        row.emitted = text.len();
    }
    row.out.text = text;
    Ok(())
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
