//! Grading one response against a reference answer without any network: GSM8K by the final
//! number, MATH by the last `\boxed{}` (with fallbacks) and LaTeX-aware equivalence. The optional
//! external judge lives in `judge.rs` and is re-exported here.

use std::str::FromStr;

use super::extract::{answer_phrase, canonical_number, last_boxed, last_math_span, numbers};
pub use super::judge::run_judge;
use super::math_equiv::equivalent;
use super::math_eval::evaluate;
use super::math_norm::normalize;
use crate::error::Error;

/// Which grading rules apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradeKind {
    /// The final number of the response, compared numerically.
    Gsm8k,
    /// The boxed (or otherwise marked) answer, compared as LaTeX mathematics.
    Math,
}

impl FromStr for GradeKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "gsm8k" => Ok(GradeKind::Gsm8k),
            "math" | "math500" => Ok(GradeKind::Math),
            other => Err(Error::Input(format!(
                "grade kind: expected gsm8k, math or math500, found {other:?}"
            ))),
        }
    }
}

/// The outcome of grading one response.
/// Serialises as `{"extracted": "..." | null, "correct": bool}` (the `grade --json` output).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Graded {
    /// The answer found in the response (GSM8K: canonical number, MATH: the raw LaTeX), if any.
    pub extracted: Option<String>,
    pub correct: bool,
}

/// The text after the last `</think>` (a thinking model's answer), else the whole response.
pub fn answer_part(response: &str) -> &str {
    match response.rfind("</think>") {
        Some(at) => &response[at + "</think>".len()..],
        None => response,
    }
}

/// Grades `response` against `reference` under the rules of `kind`.
pub fn grade(kind: GradeKind, reference: &str, response: &str) -> Graded {
    let response = answer_part(response);
    match kind {
        GradeKind::Gsm8k => {
            let extracted = extract_gsm8k(response);
            let correct = extracted
                .as_deref()
                .is_some_and(|e| gsm8k_equal(reference, e));
            Graded { extracted, correct }
        }
        GradeKind::Math => {
            let extracted = extract_math(response);
            let reference = last_boxed(reference).unwrap_or_else(|| reference.to_string());
            let correct = extracted
                .as_deref()
                .is_some_and(|e| equivalent(&reference, e));
            Graded { extracted, correct }
        }
    }
}

/// The GSM8K answer of a response: the number after the last of `####`, `\boxed{}` or an answer
/// phrase ("The answer is"), else the last number in the text; canonical (`$1,234.50` → `1234.5`).
pub fn extract_gsm8k(response: &str) -> Option<String> {
    let response = &gsm8k_spelling(response);
    let mut marked: Vec<(usize, Option<String>)> = Vec::new();
    if let Some(at) = response.rfind("####") {
        let line = response[at + 4..].lines().next().unwrap_or("");
        let first = numbers(result_of(line)).into_iter().next();
        marked.push((at, first.map(|n| n.text)));
    }
    if let Some(content) = last_boxed(response) {
        let at = response.rfind("\\boxed").max(response.rfind("\\fbox"));
        marked.push((at.unwrap_or(0), boxed_number(&content)));
    }
    if let Some((at, text)) = answer_phrase(response) {
        let first = numbers(result_of(&text)).into_iter().next();
        marked.push((at, first.map(|n| n.text)));
    }
    // The marker written last is the model's final word; one without a number is skipped.
    marked.sort_by_key(|(at, _)| *at);
    if let Some(found) = marked.into_iter().rev().find_map(|(_, n)| n) {
        return Some(found);
    }
    numbers(response).pop().map(|n| n.text)
}

/// LaTeX and Unicode spellings of GSM8K numbers as `numbers` reads them: `70{,}000`, `70,\!000`
/// and `70\,000` group thousands as `70,000` does; `−3` (U+2212) is `-3`.
fn gsm8k_spelling(response: &str) -> String {
    response
        .replace("{,}", ",")
        .replace(",\\!", ",")
        .replace("\\,", ",")
        .replace('\u{2212}', "-")
}

/// What a marked answer comes to when the model wrote the working after the marker
/// (`#### 9 * 2 = 18`, `The answer is 20 - 5 = 15`): the part after the last `=` before any
/// parenthesis or `;` (a remark such as `20 (5 = 5 + 0)` is not the result).
fn result_of(marked: &str) -> &str {
    let head = &marked[..marked.find(['(', ';']).unwrap_or(marked.len())];
    head.rfind('=').map_or(head, |i| &head[i + 1..])
}

/// The number inside a box: the only number, else the value of a LaTeX expression (`\frac{9}{2}`),
/// else the last number.
fn boxed_number(content: &str) -> Option<String> {
    let mut found = numbers(content);
    if found.len() == 1 {
        return Some(found[0].text.clone());
    }
    let value = evaluate(&normalize(content)).map(|v| v[0]);
    if let Some(v) = value.filter(|v| v.im == 0.0 && v.re.is_finite()) {
        return Some(canonical_number(&format!("{}", v.re)));
    }
    found.pop().map(|n| n.text)
}

/// Whether an extracted GSM8K number equals the reference (which may still hold `#### N`).
fn gsm8k_equal(reference: &str, extracted: &str) -> bool {
    let reference = reference.rsplit("####").next().unwrap_or(reference);
    let Some(want) = numbers(reference).pop() else {
        return reference.trim() == extracted.trim();
    };
    match (want.text.parse::<f64>(), extracted.parse::<f64>()) {
        // GSM8K answers are exact decimals; the tolerance only absorbs the f64 parse of each.
        (Ok(a), Ok(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
        _ => false,
    }
}

/// The MATH answer of a response: the last `\boxed{}`/`\fbox{}`, else the text after the last
/// answer phrase, else the last inline math span, else a short one-line response itself.
pub fn extract_math(response: &str) -> Option<String> {
    if let Some(b) = last_boxed(response) {
        return Some(b);
    }
    if let Some((_, text)) = answer_phrase(response) {
        if !text.is_empty() {
            return Some(text);
        }
    }
    if let Some(m) = last_math_span(response) {
        return Some(m);
    }
    let t = response.trim();
    // A bare answer such as `3` or `\frac12` (the `grade` command, terse models).
    // An unclosed `\boxed{` (cut off by the token limit) is no answer.
    if !t.is_empty() && t.len() <= 64 && !t.contains('\n') && !t.contains("\\boxed") {
        return Some(t.trim_end_matches('.').trim().to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_part_takes_text_after_think() {
        assert_eq!(answer_part("<think>5</think> 6"), " 6");
        assert_eq!(answer_part("a</think>b</think>c"), "c");
        assert_eq!(answer_part("no think"), "no think");
    }

    #[test]
    fn kind_parses() {
        assert_eq!("GSM8K".parse::<GradeKind>().unwrap(), GradeKind::Gsm8k);
        assert!("maths".parse::<GradeKind>().is_err());
        let g = grade(GradeKind::Math, "\\frac12", "\\boxed{0.5}");
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(json, r#"{"extracted":"0.5","correct":true}"#);
    }
}
