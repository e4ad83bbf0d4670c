//! Thinking-model traces: one JSON line per question with the prompt, the generated text and
//! the thinking span (byte offsets into `text`). Written as each batch finishes, so an
//! interrupted run resumes by skipping the indices already in the file.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::generate::{generate_each, GenParams};
use crate::sentences::thinking_span_with;
use crate::tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Row of the questions file (0-based).
    pub index: usize,
    pub question: String,
    /// The rendered chat prompt the model continued.
    pub prompt: String,
    /// The generated text (without the eos token).
    pub text: String,
    /// Byte range of `text` between `<think>` (or the start, when the prompt opened the span)
    /// and `</think>` (or the end); None when the text has no thinking span.
    pub thinking: Option<Span>,
    /// Generated ids the tokenizer does not know (the model's padded vocabulary rows), left
    /// out of `text`.
    #[serde(default)]
    pub unknown_ids: usize,
}

/// Whether a prompt leaves a thinking span open (R1-style generation prompts end in
/// `<think>\n`): its last `<think>` comes after its last `</think>`.
pub fn prompt_opens_thinking(prompt: &str) -> bool {
    match (prompt.rfind("<think>"), prompt.rfind("</think>")) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The thinking span of `text` generated after `prompt`.
pub fn thinking_of(prompt: &str, text: &str) -> Option<Span> {
    thinking_span_with(text, prompt_opens_thinking(prompt)).map(|(start, end)| Span { start, end })
}

/// Reads a traces file, in question-index order. A final line without its newline (a run
/// killed mid-write) is ignored when it does not parse; any other bad line is an error naming
/// it.
pub fn read_traces(path: &Path) -> Result<Vec<Trace>> {
    let text = crate::files::read_text(path)?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Trace>(line) {
            Ok(t) => {
                if let Some(s) = t.thinking {
                    let fits = |b: usize| t.text.is_char_boundary(b);
                    if !(s.start <= s.end && fits(s.start) && fits(s.end)) {
                        bail!(
                            "{}:{}: expected a thinking span within the text (0..{} bytes, on character boundaries), found {}..{}",
                            path.display(),
                            i + 1,
                            t.text.len(),
                            s.start,
                            s.end
                        );
                    }
                }
                out.push(t)
            }
            Err(_) if i + 1 == lines.len() && !complete => eprintln!(
                "note: {}:{}: an incomplete last line (a run killed while writing it?), skipped",
                path.display(),
                i + 1
            ),
            Err(e) => bail!(
                "{}:{}: expected a trace {{\"index\", \"question\", \"prompt\", \"text\", \"thinking\"}}, found a line that does not parse: {e}",
                path.display(),
                i + 1
            ),
        }
    }
    // Lines are written as rows finish, so their order depends on where a resumed run started;
    // every reader sees them by question index, so a resumed file gives the same outputs.
    out.sort_by_key(|t| t.index);
    if let Some(w) = out.windows(2).find(|w| w[0].index == w[1].index) {
        bail!(
            "{}: expected one trace per question index, found index {} twice (two runs into one file?)",
            path.display(),
            w[0].index
        );
    }
    Ok(out)
}

/// An input error while using one trace, named by its file and question index.
pub fn in_trace(path: &Path, t: &Trace, e: Error) -> Error {
    match e {
        Error::Input(m) => Error::Input(format!("{}: trace {}: {m}", path.display(), t.index)),
        e => e,
    }
}

#[derive(Clone, Debug)]
pub struct TraceSettings {
    pub max_new_tokens: usize,
    /// Questions decoded together; a finished one's slot takes the next.
    pub batch: usize,
    /// Run on the GPU (the CUDA engine) instead of the CPU.
    pub cuda: bool,
    /// Give traces without a `<think>` span their whole answer (`whole_answer_as_thinking`),
    /// after the run; recorded, so that a resume must ask the same.
    pub whole_answer: bool,
}

/// What decides a trace besides its question, kept beside the traces file (`traces.jsonl` →
/// `traces.settings.json`), so that a rerun with another model or length is refused instead of
/// mixing two runs' traces in one file.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct TraceRun {
    model: String,
    max_new_tokens: usize,
    /// Traces without a `<think>` span get the whole answer (`--whole-answer`).
    #[serde(default)]
    whole_answer: bool,
    /// `weights::checkpoint_fingerprint` of the model: a checkpoint replaced under the same
    /// path is another model (absent in settings written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
}

impl TraceRun {
    /// The settings but the fingerprint.
    fn flags(&self) -> (&str, usize, bool) {
        (&self.model, self.max_new_tokens, self.whole_answer)
    }
}

/// The settings file of a traces file.
pub fn settings_path(out: &Path) -> std::path::PathBuf {
    out.with_extension("settings.json")
}

/// Refuses to append to `out` when its traces came from other questions (a trace whose row of
/// `questions` holds another question) or, per its settings file, another model or length.
fn check_resume(out: &Path, old: &[Trace], questions: &[String], run: &TraceRun) -> Result<()> {
    if old.is_empty() {
        return Ok(()); // a run that failed before its first trace decided nothing
    }
    let other = old
        .iter()
        .find(|t| questions.get(t.index).is_some_and(|q| *q != t.question));
    if let Some(t) = other {
        bail!(
            "{}: trace {} answers another question than row {} of these questions: expected the same questions to resume, use another --out",
            out.display(),
            t.index,
            t.index
        );
    }
    let path = settings_path(out);
    if !path.exists() {
        bail!(
            "{}: holds {} traces but no settings file {}: expected the settings of the run that wrote them (model, --max-new-tokens) to resume, use another --out",
            out.display(),
            old.len(),
            path.display()
        );
    }
    let text = crate::files::read_text(&path)?;
    let was: TraceRun = serde_json::from_str(&text).map_err(|e| {
        Error::Input(format!(
            "{}: expected the settings of a traces file, found unreadable JSON ({e})",
            path.display()
        ))
    })?;
    let changed = crate::weights::checkpoint_changed(
        &was.model,
        was.fingerprint.as_deref(),
        run.fingerprint.as_deref(),
    );
    if let Some(what) = changed.filter(|_| was.flags() == run.flags()) {
        bail!(
            "{} holds traces of {what}: expected the same checkpoint to resume, use another --out",
            out.display()
        );
    }
    if was.flags() != run.flags() {
        let flag = |r: &TraceRun| {
            if r.whole_answer {
                " and --whole-answer"
            } else {
                ""
            }
        };
        bail!(
            "{} holds traces of {} with --max-new-tokens {}{}, now {} with {}{}: expected the same settings to resume, use another --out",
            out.display(),
            was.model,
            was.max_new_tokens,
            flag(&was),
            run.model,
            run.max_new_tokens,
            flag(run)
        );
    }
    Ok(())
}

/// Generates traces for `questions` (greedy, chat template) into `out`, skipping indices
/// already there (refused when those came from other questions or settings); with
/// `whole_answer`, then gives traces without a span their whole answer.
pub fn write_traces(
    model_dir: &Path,
    questions: &[String],
    out: &Path,
    s: &TraceSettings,
    mut progress: impl FnMut(&Trace),
) -> Result<Written> {
    let mut ckpt = crate::engine::Checkpoint::open(model_dir)?;
    let tok = Tokenizer::from_dir(model_dir)?.ok_or_else(|| {
        Error::Input(format!(
            "{}: traces need tokenizer.json in the model folder, found none",
            model_dir.display()
        ))
    })?;
    let tpl = ChatTemplate::from_dir(model_dir)?.ok_or_else(|| {
        Error::Input(format!(
            "{}: traces need a chat template (tokenizer_config.json or chat_template.jinja), found none",
            model_dir.display()
        ))
    })?;
    let run = TraceRun {
        model: crate::eval::cli::abs(model_dir),
        max_new_tokens: s.max_new_tokens,
        whole_answer: s.whole_answer,
        fingerprint: Some(crate::weights::checkpoint_fingerprint(model_dir)?),
    };
    let _lock = crate::files::lock_output(out, "--out")?;
    let done: BTreeSet<usize> = if out.exists() {
        crate::files::cut_torn_line(out)?;
        let old = read_traces(out)?;
        check_resume(out, &old, questions, &run)?;
        // Kept, and read by every later step (a shorter --limit than the run that wrote them).
        let past = old.iter().filter(|t| t.index >= questions.len()).count();
        if past > 0 {
            eprintln!(
                "note: {} also holds {past} traces of questions past these {}: kept, and read by the steps that take this file",
                out.display(),
                questions.len()
            );
        }
        old.into_iter().map(|t| t.index).collect()
    } else {
        BTreeSet::new()
    };
    let path = settings_path(out);
    let text = serde_json::to_string_pretty(&run).expect("settings serialise") + "\n";
    crate::files::write_atomic(&path, text.as_bytes())?;
    let todo: Vec<usize> = (0..questions.len()).filter(|i| !done.contains(i)).collect();
    let skipped = questions.len() - todo.len();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(|e| Error::io(out, e))?;
    let ctx_max = ckpt.config.max_position_embeddings;
    let params = GenParams::greedy(s.max_new_tokens, ckpt.config.eos_token_ids.clone());
    let prompts: Vec<String> = todo
        .iter()
        .map(|&i| tpl.render(&[Message::user(&questions[i])], true))
        .collect::<Result<_>>()?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_>>()?;
    let longest = ids.iter().map(|p| p.len()).max().unwrap_or(0);
    if longest >= ctx_max {
        bail!(
            "question {} renders to a {longest}-token prompt: expected fewer than the model's context of {ctx_max}",
            todo[ids.iter().position(|p| p.len() == longest).unwrap_or(0)]
        );
    }
    if todo.is_empty() {
        return finish(out, s, 0, skipped);
    }
    let ctx = ctx_max.min(longest + s.max_new_tokens);
    let slots = s.batch.max(1).min(todo.len());
    let mut engine = ckpt.decoder(slots, ctx, s.cuda)?;
    let mut written = 0;
    // Every question in one call; each trace is written the moment its row finishes.
    generate_each(
        engine.as_mut(),
        None,
        &ids,
        &params,
        |_, _| {},
        |k, g| {
            let i = todo[k];
            let eos = &params.eos_ids;
            // Decoded here rather than by `generate`, so that greedy picks among the padded
            // vocabulary rows (no text) are counted.
            let body: Vec<u32> = g
                .ids
                .iter()
                .copied()
                .filter(|id| !eos.contains(id))
                .collect();
            let unknown_ids = body
                .iter()
                .filter(|id| tok.id_to_token(**id).is_none())
                .count();
            let text = tok.decode(&body)?;
            let prompt = prompts[k].clone();
            let thinking = thinking_of(&prompt, &text);
            let t = Trace {
                index: i,
                question: questions[i].clone(),
                prompt,
                text,
                thinking,
                unknown_ids,
            };
            let line = serde_json::to_string(&t).expect("a trace always serialises");
            writeln!(file, "{line}")
                .and_then(|_| file.flush())
                .map_err(|e| Error::io(out, e))?;
            progress(&t);
            written += 1;
            Ok(())
        },
    )?;
    finish(out, s, written, skipped)
}

/// What `write_traces` did.
#[derive(Debug)]
pub struct Written {
    /// Traces generated now.
    pub written: usize,
    /// Traces already in the file.
    pub skipped: usize,
    /// With `whole_answer`: (traces whose span the model wrote, traces given the whole answer).
    pub spans: Option<(usize, usize)>,
}

fn finish(out: &Path, s: &TraceSettings, written: usize, skipped: usize) -> Result<Written> {
    let spans = match s.whole_answer {
        true => Some(whole_answer_as_thinking(out)?),
        false => None,
    };
    Ok(Written {
        written,
        skipped,
        spans,
    })
}

/// Gives every trace without a thinking span the whole answer as its span (a model that does
/// not think in `<think>` tags still reasons in its answer) and rewrites the file when any
/// changed. Returns (traces whose span the model wrote, traces given the whole answer).
pub fn whole_answer_as_thinking(path: &Path) -> Result<(usize, usize)> {
    let mut ts = read_traces(path)?;
    let mut changed = false;
    let (mut own, mut filled) = (0, 0);
    for t in &mut ts {
        // Judged from the text, not the stored span, so a resumed run counts the same.
        if thinking_of(&t.prompt, &t.text).is_some() {
            own += 1;
            continue;
        }
        filled += 1;
        if t.thinking.is_none() {
            t.thinking = Some(Span {
                start: 0,
                end: t.text.len(),
            });
            changed = true;
        }
    }
    if changed {
        let mut text = String::new();
        for t in &ts {
            text += &serde_json::to_string(t).expect("a trace serialises");
            text.push('\n');
        }
        crate::files::write_atomic(path, text.as_bytes())?;
    }
    Ok((own, filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(index: usize, prompt: &str, text: &str) -> Trace {
        Trace {
            index,
            question: "q".into(),
            prompt: prompt.into(),
            text: text.into(),
            thinking: thinking_of(prompt, text),
            unknown_ids: 0,
        }
    }

    #[test]
    fn traces_are_read_in_question_order() {
        // A resumed run appends its rows after the killed run's, as they finish.
        let path = std::env::temp_dir().join(format!("ts-order-{}.jsonl", std::process::id()));
        let lines: Vec<String> = [2, 0, 3, 1]
            .iter()
            .map(|&i| serde_json::to_string(&trace(i, "p", "<think>a</think>")).unwrap())
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let order: Vec<usize> = read_traces(&path)
            .unwrap()
            .iter()
            .map(|t| t.index)
            .collect();
        assert_eq!(order, [0, 1, 2, 3]);
        // Two runs appended into one file: refused, not read twice.
        std::fs::write(&path, format!("{}\n{}\n", lines[3], lines[3])).unwrap();
        let e = read_traces(&path).unwrap_err().to_string();
        assert!(e.contains("found index 1 twice"), "{e}");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn answers_without_a_span_become_the_span() {
        let dir =
            std::env::temp_dir().join(format!("thinksteer-traces-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("traces.jsonl");
        let ts = [
            trace(0, "<|im_start|>assistant\n", "First add. Then multiply."),
            trace(1, "x", "<think>a b c.</think> done"),
        ];
        let text: String = ts
            .iter()
            .map(|t| serde_json::to_string(t).unwrap() + "\n")
            .collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(whole_answer_as_thinking(&path).unwrap(), (1, 1));
        let back = read_traces(&path).unwrap();
        assert_eq!(back[0].thinking, Some(Span { start: 0, end: 25 }));
        assert_eq!(back[1].thinking, ts[1].thinking);
        // A second pass changes nothing and counts the same.
        let before = std::fs::read(&path).unwrap();
        assert_eq!(whole_answer_as_thinking(&path).unwrap(), (1, 1));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn prompt_opening() {
        assert!(prompt_opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!prompt_opens_thinking("<think>a</think>\nuser"));
        assert!(!prompt_opens_thinking("plain"));
        assert_eq!(
            thinking_of("x<think>\n", "abc"),
            Some(Span { start: 0, end: 3 })
        );
        assert_eq!(thinking_of("plain", "abc"), None);
        assert_eq!(
            thinking_of("plain", "<think>ab</think>c"),
            Some(Span { start: 7, end: 9 })
        );
    }
}
