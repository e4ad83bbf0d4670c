//! Finding the answer inside a model's response: the last `\boxed{}`/`\fbox{}` (nested braces),
//! "the answer is …" phrases, inline math spans, and numbers (for GSM8K) with thousands commas,
//! `$` and signs.

use super::math_eval::{evaluate, has_variables};
use super::math_norm::matching_brace;

/// The content of the last non-empty `\boxed{...}` or `\fbox{...}` (or `\boxed 5`), if any.
pub fn last_boxed(s: &str) -> Option<String> {
    let mut end = s.len();
    loop {
        let head = &s[..end];
        let (at, len) = ["\\boxed", "\\fbox"]
            .iter()
            .filter_map(|k| head.rfind(k).map(|i| (i, k.len())))
            .max_by_key(|(i, _)| *i)?;
        match box_content(s, at + len) {
            Some(c) if !c.is_empty() => return Some(c),
            // An empty box says nothing; an unclosed one (cut off by the token limit) neither.
            _ => end = at,
        }
    }
}

/// The argument of a box command whose name ends at `after`: `{...}` or a space and one word.
fn box_content(s: &str, after: usize) -> Option<String> {
    let rest = &s[after..];
    let trimmed = rest.trim_start();
    let open = after + (rest.len() - trimmed.len());
    if trimmed.starts_with('{') {
        let close = matching_brace(s, open)?;
        return Some(s[open + 1..close - 1].trim().to_string());
    }
    if rest.starts_with(' ') {
        let word: String = trimmed
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '$')
            .collect();
        return Some(word);
    }
    None
}

/// Phrases that introduce a final answer, most specific first.
const ANSWER_PHRASES: &[&str] = &[
    "final answer is",
    "final answer:",
    "the answer is",
    "answer is:",
    "answer:",
];

/// The text after the last answer phrase up to the end of its line, and where the phrase starts.
pub fn answer_phrase(s: &str) -> Option<(usize, String)> {
    let lower = s.to_ascii_lowercase();
    let (at, len) = ANSWER_PHRASES
        .iter()
        .filter_map(|p| lower.rfind(p).map(|i| (i, p.len())))
        .max_by_key(|(i, len)| (*i + *len, *len))?;
    let rest = &s[at + len..];
    let line = rest.lines().next().unwrap_or("").trim();
    let line = line.trim_start_matches(':').trim();
    Some((at, clean_phrase_answer(line)))
}

/// `$\frac12$. Because …` → `\frac12`: the first math span if any, else up to the sentence end.
fn clean_phrase_answer(line: &str) -> String {
    if let Some(m) = first_math_span(line) {
        return m;
    }
    let line = line.replace("**", "");
    let end = line
        .char_indices()
        .find(|&(i, c)| {
            (c == '.' || c == ',' || c == ';') && line[i + 1..].starts_with(char::is_whitespace)
        })
        .map_or(line.len(), |(i, _)| i);
    let text = line[..end].trim().trim_end_matches('.').trim();
    // `2 because x=2` → `2`: a leading constant followed by words is the answer; followed by an
    // operator (`20 - 5 = 15`, `9 x 2 = 18`) it is the start of the working.
    if let Some((first, rest)) = text.split_once(char::is_whitespace) {
        let first = first.trim_end_matches([',', '.', ';', ':']);
        let rest = rest.trim_start();
        let words = (rest.starts_with(char::is_alphabetic)
            && !["x ", "times ", "plus ", "minus "]
                .iter()
                .any(|op| rest.starts_with(op)))
            || rest.starts_with("\\text");
        if words && evaluate(first).is_some() && !has_variables(first) {
            return first.to_string();
        }
    }
    text.to_string()
}

/// The spans delimited by `$...$`, `$$...$$`, `\(...\)` and `\[...\]`, in order.
fn math_spans(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        let (open, close) = if rest.starts_with("$$") {
            ("$$", "$$")
        } else if rest.starts_with('$') && !s[..i].ends_with('\\') {
            ("$", "$")
        } else if rest.starts_with("\\(") {
            ("\\(", "\\)")
        } else if rest.starts_with("\\[") {
            ("\\[", "\\]")
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let body = &rest[open.len()..];
        match find_unescaped(body, close) {
            Some(end) => {
                let span = body[..end].trim();
                if !span.is_empty() {
                    out.push(span.to_string());
                }
                i += open.len() + end + close.len();
            }
            None => break,
        }
    }
    out
}

/// The first occurrence of `close` not preceded by a backslash (so `\$` stays inside a span).
fn find_unescaped(body: &str, close: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(rel) = body[from..].find(close) {
        let at = from + rel;
        if close.starts_with('$') && body[..at].ends_with('\\') {
            from = at + 1;
            continue;
        }
        return Some(at);
    }
    None
}

fn first_math_span(s: &str) -> Option<String> {
    math_spans(s).into_iter().next()
}

/// The last inline math span of the text.
pub fn last_math_span(s: &str) -> Option<String> {
    math_spans(s).pop()
}

/// A number found in text: where it starts and its canonical form (`-1,234.50` → `-1234.5`).
#[derive(Debug, Clone, PartialEq)]
pub struct FoundNumber {
    pub start: usize,
    pub text: String,
}

/// Every number in the text, in order. A `-` directly before a digit (or `$`) is a sign unless it
/// follows a letter or digit (`16-3` is a difference); commas group thousands only in threes.
pub fn numbers(s: &str) -> Vec<FoundNumber> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts_digit = b[i].is_ascii_digit()
            || (b[i] == b'.'
                && b.get(i + 1).is_some_and(u8::is_ascii_digit)
                && (i == 0 || !b[i - 1].is_ascii_digit()));
        if !starts_digit {
            i += 1;
            continue;
        }
        let mut start = i;
        let mut negative = false;
        let mut j = i;
        if j > 0 && b[j - 1] == b'$' {
            j -= 1;
        }
        if j > 0 && b[j - 1] == b'-' && (j < 2 || !b[j - 2].is_ascii_alphanumeric()) {
            negative = true;
            start = j - 1;
        }
        let mut text = String::new();
        if negative {
            text.push('-');
        }
        while i < b.len() && b[i].is_ascii_digit() {
            text.push(b[i] as char);
            i += 1;
        }
        // Thousands groups: `,ddd` not followed by another digit.
        while b.get(i) == Some(&b',')
            && b.get(i + 1..i + 4)
                .is_some_and(|g| g.iter().all(u8::is_ascii_digit))
            && !b.get(i + 4).is_some_and(u8::is_ascii_digit)
        {
            text.push_str(&s[i + 1..i + 4]);
            i += 4;
        }
        if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            text.push('.');
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                text.push(b[i] as char);
                i += 1;
            }
        }
        out.push(FoundNumber {
            start,
            text: canonical_number(&text),
        });
    }
    out
}

/// `018.50` → `18.5`, `-0.0` → `0`, `.5` → `0.5`: one spelling per value for the `extracted` field.
pub fn canonical_number(t: &str) -> String {
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let mut out = String::new();
    if neg && !(int == "0" && frac.is_empty()) {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nums(s: &str) -> Vec<String> {
        numbers(s).into_iter().map(|n| n.text).collect()
    }

    #[test]
    fn finds_numbers() {
        assert_eq!(nums("16-3-4=9"), ["16", "3", "4", "9"]);
        assert_eq!(nums("It is -5, then $1,234.50."), ["-5", "1234.5"]);
        assert_eq!(nums("(3,5) and 1,2345"), ["3", "5", "1", "2345"]);
        assert_eq!(nums("x-2 or .5"), ["2", "0.5"]);
    }

    #[test]
    fn boxes_and_phrases() {
        assert_eq!(
            last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}").unwrap(),
            "\\frac{a}{b}"
        );
        assert_eq!(last_boxed("\\fbox{7}").unwrap(), "7");
        assert_eq!(last_boxed("so \\boxed 5$.").unwrap(), "5");
        assert!(last_boxed("\\boxed{\\frac{1}{2}").is_none());
        assert_eq!(
            last_boxed("\\boxed{1} and \\boxed{} \\boxed{2").unwrap(),
            "1"
        );
        assert_eq!(
            answer_phrase("The answer is 2 because x=2.").unwrap().1,
            "2"
        );
        assert_eq!(
            answer_phrase("The answer is $\\frac12$. Done").unwrap().1,
            "\\frac12"
        );
        assert_eq!(answer_phrase("Final answer: 42. Yes").unwrap().1, "42");
        assert_eq!(last_math_span("a $x$ and $\\$5$").unwrap(), "\\$5");
    }
}
