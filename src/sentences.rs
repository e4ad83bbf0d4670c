//! Sentence splitting of reasoning traces with byte offsets (hybrid.md §2.1: sentences of at
//! least 3 words inside the thinking span), and finding that span.
//!
//! Rules: a sentence ends at a run of `.`, `!`, `?` (optionally followed by closing quotes,
//! brackets or `*`) when whitespace or the end of the text follows, and at every newline. It
//! does not end at a decimal point (3.14: no whitespace follows), after a common abbreviation
//! (e.g., i.e., Mr., Dr., vs., …), after a list number at the start of a line ("1. "), or inside
//! LaTeX math: `$…$` (pandoc's rule: the opening `$` is followed by a non-space, the closing one
//! is preceded by a non-space and not followed by a digit, both on one line, so "$5. … $10"
//! stays prose), `$$…$$`, `\(…\)`, `\[…\]` (these may span lines).

/// Abbreviations (lower case, with their final dot) after which a sentence does not end.
/// "etc." is left out on purpose: it ends sentences at least as often as not.
const ABBREVIATIONS: &[&str] = &[
    "e.g.", "i.e.", "mr.", "mrs.", "ms.", "dr.", "prof.", "vs.", "cf.", "approx.", "fig.", "eq.",
    "eqs.", "no.", "st.", "jr.", "sr.", "resp.", "viz.", "al.", "ca.",
];

/// Closing characters that may sit between the terminator and the following whitespace.
const CLOSERS: &[char] = &['"', '\'', ')', ']', '*', '\u{201d}', '\u{2019}'];

/// Byte ranges [start, end) of the sentences of `text` with at least 3 words (a word is a
/// whitespace-separated token containing a letter or digit); ranges are trimmed of whitespace.
pub fn split_sentences(text: &str) -> Vec<(usize, usize)> {
    let math = math_spans(text);
    let bytes = text.as_bytes();
    let mut raw = Vec::new();
    let mut start = 0usize;
    let mut m = 0usize; // next math span that may contain i
    let mut i = 0usize;
    while i < bytes.len() {
        while m < math.len() && math[m].1 <= i {
            m += 1;
        }
        if m < math.len() && math[m].0 <= i {
            i = math[m].1;
            continue;
        }
        let c = bytes[i];
        if c == b'\n' {
            raw.push((start, i));
            start = i + 1;
            i += 1;
            continue;
        }
        if matches!(c, b'.' | b'!' | b'?') {
            let mut j = i;
            while j < bytes.len() && matches!(bytes[j], b'.' | b'!' | b'?') {
                j += 1;
            }
            let single_dot = c == b'.' && j == i + 1;
            let mut e = j;
            while let Some(ch) = text[e..].chars().next().filter(|ch| CLOSERS.contains(ch)) {
                e += ch.len_utf8();
            }
            let at_boundary = text[e..].chars().next().is_none_or(char::is_whitespace);
            if at_boundary && !(single_dot && (is_abbreviation(text, i) || is_list_number(text, i)))
            {
                raw.push((start, e));
                start = e;
            }
            i = j;
            continue;
        }
        i += 1;
    }
    raw.push((start, bytes.len()));
    raw.into_iter()
        .filter_map(|(s, e)| trim(text, s, e))
        .filter(|&(s, e)| word_count(&text[s..e]) >= 3)
        .collect()
}

/// The whitespace-delimited token ending at the dot at `dot`, as written (from the token start
/// through the dot), without leading opening brackets or quotes.
fn token_before(text: &str, dot: usize) -> &str {
    let s = text[..dot].rfind(char::is_whitespace).map_or(0, |p| {
        p + text[p..].chars().next().map_or(1, char::len_utf8)
    });
    text[s..=dot].trim_start_matches(['(', '[', '"', '\'', '\u{201c}', '\u{2018}'])
}

fn is_abbreviation(text: &str, dot: usize) -> bool {
    let tok = token_before(text, dot).to_lowercase();
    ABBREVIATIONS.contains(&tok.as_str())
}

/// "12." as the first token of a line is a list marker, not a sentence end.
fn is_list_number(text: &str, dot: usize) -> bool {
    let tok = token_before(text, dot);
    let digits = &tok[..tok.len() - 1];
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let tok_start = dot + 1 - tok.len();
    let line_start = text[..tok_start].rfind('\n').map_or(0, |p| p + 1);
    text[line_start..tok_start].trim().is_empty()
}

fn trim(text: &str, s: usize, e: usize) -> Option<(usize, usize)> {
    let piece = &text[s..e];
    let t = piece.trim_start();
    let s2 = s + (piece.len() - t.len());
    let t = t.trim_end();
    (!t.is_empty()).then_some((s2, s2 + t.len()))
}

fn word_count(s: &str) -> usize {
    s.split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .count()
}

/// Byte ranges [start, end) of LaTeX math, delimiters included, in order and disjoint.
fn math_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0usize;
    while i < b.len() {
        let next = |k: usize| b.get(k).copied();
        if b[i] == b'\\' {
            let close: Option<&str> = match next(i + 1) {
                Some(b'(') => Some("\\)"),
                Some(b'[') => Some("\\]"),
                _ => None,
            };
            if let Some(cl) = close {
                if let Some(p) = text[i + 2..].find(cl) {
                    let end = i + 2 + p + 2;
                    spans.push((i, end));
                    i = end;
                    continue;
                }
            }
            // `\$` and other escapes: skip the escaped byte too.
            i += 2;
            continue;
        }
        if b[i] == b'$' {
            if next(i + 1) == Some(b'$') {
                if let Some(p) = text[i + 2..].find("$$") {
                    let end = i + 2 + p + 2;
                    spans.push((i, end));
                    i = end;
                } else {
                    i += 2;
                }
                continue;
            }
            if let Some(end) = inline_dollar_close(b, i) {
                spans.push((i, end));
                i = end;
                continue;
            }
        }
        i += 1;
    }
    spans
}

/// For a `$` at `open`: the end (exclusive) of its inline math under pandoc's rule, if any.
fn inline_dollar_close(b: &[u8], open: usize) -> Option<usize> {
    let first = *b.get(open + 1)?;
    if first.is_ascii_whitespace() {
        return None;
    }
    let mut j = open + 1;
    while j < b.len() && b[j] != b'\n' {
        if b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == b'$' {
            let prev_ok = j > open + 1 && !b[j - 1].is_ascii_whitespace();
            let next_ok = !b.get(j + 1).is_some_and(u8::is_ascii_digit);
            if prev_ok && next_ok {
                return Some(j + 1);
            }
            // A `$` that cannot close cannot be inside this span either: "$5 and $6".
            return None;
        }
        j += 1;
    }
    None
}

/// The thinking span of a generated text: from after `<think>` (or from the start when there is
/// no `<think>` but a `</think>`, i.e. the prompt ended with `<think>\n`) to before `</think>`
/// (or to the end when the generation stopped inside the span). None when neither tag occurs;
/// use `thinking_span_with(text, true)` when the prompt is known to have opened the span.
pub fn thinking_span(text: &str) -> Option<(usize, usize)> {
    thinking_span_with(text, false)
}

/// As `thinking_span`; with `starts_inside` a text with no tags at all is one (unfinished)
/// thinking span.
pub fn thinking_span_with(text: &str, starts_inside: bool) -> Option<(usize, usize)> {
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    let start = match text.find(OPEN) {
        Some(p) => p + OPEN.len(),
        None if starts_inside || text.contains(CLOSE) => 0,
        None => return None,
    };
    let end = text[start..].find(CLOSE).map_or(text.len(), |p| start + p);
    Some((start, end))
}

/// Sentences of the thinking span, as byte ranges into `text`; None when there is no span.
pub fn thinking_sentences(text: &str, starts_inside: bool) -> Option<Vec<(usize, usize)>> {
    let (s, e) = thinking_span_with(text, starts_inside)?;
    Some(
        split_sentences(&text[s..e])
            .into_iter()
            .map(|(a, b)| (a + s, b + s))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sents(t: &str) -> Vec<&str> {
        split_sentences(t)
            .into_iter()
            .map(|(s, e)| &t[s..e])
            .collect()
    }

    #[test]
    fn basic_terminators_and_offsets() {
        let t = "  First we add the numbers. Is that right? Yes it is!  Done now ok";
        assert_eq!(
            sents(t),
            vec![
                "First we add the numbers.",
                "Is that right?",
                "Yes it is!",
                "Done now ok"
            ]
        );
        let r = split_sentences(t);
        assert_eq!(r[0], (2, 27));
    }

    #[test]
    fn short_sentences_are_dropped() {
        assert_eq!(
            sents("Okay. Wait, let me check this. Hmm!"),
            vec!["Wait, let me check this."]
        );
    }

    #[test]
    fn decimals_do_not_split() {
        assert_eq!(
            sents("So pi is about 3.14 in value. Then 2.5 plus 1 is 3.5 here."),
            vec![
                "So pi is about 3.14 in value.",
                "Then 2.5 plus 1 is 3.5 here."
            ]
        );
    }

    #[test]
    fn abbreviations_do_not_split() {
        assert_eq!(
            sents("Use a prime, e.g. 7 will do. Mr. Smith and Dr. Jones agree i.e. it works. Compare A vs. B here."),
            vec![
                "Use a prime, e.g. 7 will do.",
                "Mr. Smith and Dr. Jones agree i.e. it works.",
                "Compare A vs. B here."
            ]
        );
        // The same words without the abbreviation do split.
        assert_eq!(sents("We got the eg. Then we stop here.").len(), 2);
    }

    #[test]
    fn newlines_split() {
        assert_eq!(
            sents("First line has no period\nsecond line also none\n\nthird one here"),
            vec![
                "First line has no period",
                "second line also none",
                "third one here"
            ]
        );
    }

    #[test]
    fn numbered_lists_do_not_split_after_the_number() {
        assert_eq!(
            sents("Plan:\n1. Compute the total cost.\n 2. Divide by four people.\nWe need step 1. Then go on."),
            vec![
                "1. Compute the total cost.",
                "2. Divide by four people.",
                "We need step 1.",
                "Then go on."
            ]
        );
    }

    #[test]
    fn latex_does_not_split() {
        assert_eq!(
            sents(
                "We get $x = 3. y$ from it. Then \\(a. b\\) holds true. And \\[p. q\\] is shown."
            ),
            vec![
                "We get $x = 3. y$ from it.",
                "Then \\(a. b\\) holds true.",
                "And \\[p. q\\] is shown."
            ]
        );
        // Display math across lines is one piece.
        assert_eq!(
            sents("So we have $$a = b.\nc = d.$$ as needed here."),
            vec!["So we have $$a = b.\nc = d.$$ as needed here."]
        );
        // Dollar amounts are prose (pandoc's rule), so the sentence still ends after "$5.".
        assert_eq!(
            sents("The shirt costs $5. The pants cost $10 more."),
            vec!["The shirt costs $5.", "The pants cost $10 more."]
        );
    }

    #[test]
    fn closers_and_runs() {
        assert_eq!(
            sents("He said \"that is it.\" Then we left the room... Really?! Yes we did."),
            vec![
                "He said \"that is it.\"",
                "Then we left the room...",
                "Yes we did."
            ]
        );
    }

    #[test]
    fn thinking_spans() {
        let t = "<think>\nA b c. D e f.\n</think>\nanswer";
        let (s, e) = thinking_span(t).unwrap();
        assert_eq!(&t[s..e], "\nA b c. D e f.\n");
        let t2 = "A b c.\n</think> rest";
        assert_eq!(thinking_span(t2), Some((0, 7)));
        assert_eq!(thinking_span("<think> cut off"), Some((7, 15)));
        assert_eq!(thinking_span("no tags"), None);
        assert_eq!(thinking_span_with("no tags", true), Some((0, 7)));
        let ss = thinking_sentences(t, false).unwrap();
        assert_eq!(
            ss.iter().map(|&(a, b)| &t[a..b]).collect::<Vec<_>>(),
            vec!["A b c.", "D e f."]
        );
    }
}
