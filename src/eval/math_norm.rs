//! LaTeX answer normalisation for MATH grading: turns `\left( \dfrac{1}{2}, 30^\circ \right)` and
//! `(\frac12,30)` into the same string. The result has no spaces; the evaluator and the
//! structural comparison in `math_equiv` work on it.

/// Words dropped after a number (`5.4 cents`, `15 cm^2`): units never change which answer is meant.
const UNIT_WORDS: &[&str] = &[
    "degree", "degrees", "deg", "radians", "radian", "cm", "mm", "km", "meter", "meters", "metre",
    "metres", "inch", "inches", "ft", "foot", "feet", "yard", "yards", "mile", "miles", "unit",
    "units", "sq", "square", "cubic", "dollar", "dollars", "cent", "cents", "hour", "hours",
    "minute", "minutes", "second", "seconds", "day", "days", "week", "weeks", "year", "years",
    "pound", "pounds", "lb", "lbs", "ounce", "ounces", "kg", "gram", "grams", "mph", "percent",
    "students", "people", "ways", "times",
];

/// Stand-in for `\\` while normalising (a control character never found in answers).
const ROW_BREAK: &str = "\u{1}";

/// Replaces `\name` (not followed by another letter, so `\left` does not hit `\leftarrow`).
fn replace_cmd(s: &str, name: &str, with: &str) -> String {
    let pat = format!("\\{name}");
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(&pat) {
        let after = &rest[at + pat.len()..];
        out.push_str(&rest[..at]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(&pat);
        } else {
            out.push_str(with);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The index just past the `}` matching the `{` at `open`, if any.
pub fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut escaped = false;
    for (i, c) in s[open..].char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(open + i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// Unwraps `\text{...}`-like groups; a trailing group of words after a value is a unit and is
/// dropped (with a following `^2`), a group standing alone (`\text{Evelyn}`) keeps its content.
fn unwrap_text(s: &str) -> String {
    let mut s = s.to_string();
    for cmd in [
        "\\text",
        "\\textbf",
        "\\textit",
        "\\textrm",
        "\\mathrm",
        "\\mathbf",
        "\\mbox",
        "\\mathit",
        "\\operatorname",
    ] {
        let mut from = 0;
        while let Some(rel) = s[from..].find(cmd) {
            let at = from + rel;
            let open = at + cmd.len();
            let after = s[open..].trim_start();
            let open = s.len() - after.len();
            if !after.starts_with('{') {
                from = open;
                continue;
            }
            let Some(close) = matching_brace(&s, open) else {
                break;
            };
            let inner = s[open + 1..close - 1].to_string();
            let mut tail_end = close;
            let tail = &s[close..];
            for pow in ["^2", "^3", "^{2}", "^{3}"] {
                if tail.trim_start().starts_with(pow) {
                    tail_end = close + (tail.len() - tail.trim_start().len()) + pow.len();
                }
            }
            let before = s[..at].trim_end();
            let at_end = s[tail_end..].trim().trim_end_matches('.').is_empty();
            let wordy = !inner.trim().is_empty()
                && inner.chars().all(|c| c.is_ascii_alphabetic() || c == ' ');
            let after_value = before
                .ends_with(|c: char| c.is_ascii_digit() || c == '}' || c == ')')
                || before.ends_with("\\pi");
            if wordy && at_end && after_value {
                s = format!("{}{}", &s[..at], &s[tail_end..]);
                from = at;
            } else {
                s = format!("{}{}{}", &s[..at], inner, &s[close..]);
                from = at;
            }
        }
    }
    s
}

/// Drops trailing unit words (`18 dollars`, `15 square feet`, `4 cm^2`) after a value.
fn drop_unit_words(s: &str) -> String {
    let mut s = s.trim_end().trim_end_matches('.').trim_end().to_string();
    loop {
        let body = s.trim_end_matches("^2").trim_end_matches("^3").trim_end();
        let word_start = body
            .char_indices()
            .rfind(|(_, c)| !c.is_ascii_alphabetic())
            .map_or(0, |(i, c)| i + c.len_utf8());
        let word = &body[word_start..];
        let before = body[..word_start].trim_end();
        let is_unit = UNIT_WORDS.contains(&word.to_ascii_lowercase().as_str());
        // A unit follows a value after a space; `2m` with no space may be a variable product.
        let spaced = body[..word_start].ends_with(' ');
        let after_value = before.ends_with(|c: char| c.is_ascii_digit() || c == '}' || c == ')')
            || before.ends_with("\\pi");
        if is_unit && spaced && after_value {
            s = before.to_string();
        } else {
            return s;
        }
    }
}

/// Strips an outer `{...}` wrapping the whole string.
fn strip_outer_braces(mut s: &str) -> &str {
    while s.starts_with('{') && matching_brace(s, 0) == Some(s.len()) {
        s = &s[1..s.len() - 1];
    }
    s
}

/// Normalises one answer to a canonical string without spaces.
pub fn normalize(raw: &str) -> String {
    // Matrix row breaks `\\` are set aside so the spacing rule for `\ ` cannot eat half of one.
    let mut s = raw.trim().replace("\\\\", ROW_BREAK);
    // `2{,}220` groups thousands as `2,220` does; `√51` is `\sqrt{51}` (not `\sqrt5·1`).
    s = s.replace("{,}", ",");
    s = unicode_roots(&s);
    s = lists_in_words(&s);
    // Unicode that models emit in place of LaTeX.
    for (from, to) in [
        ("\u{2212}", "-"),
        ("\u{00d7}", "\\times "),
        ("\u{00b7}", "\\cdot "),
        ("\u{03c0}", "\\pi "),
        ("\u{221e}", "\\infty "),
        ("\u{221a}", "\\sqrt"),
        ("\u{00b0}", ""),
        ("\u{2264}", "\\le "),
        ("\u{2265}", "\\ge "),
    ] {
        s = s.replace(from, to);
    }
    // Degrees: `30^\circ` and `30^{\circ}` are `30`.
    for deg in ["^{\\circ}", "^\\circ", "^ \\circ", "^{ \\circ}"] {
        s = s.replace(deg, "");
    }
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\dbinom", "\\binom"),
        ("\\tbinom", "\\binom"),
        ("\\displaystyle", ""),
        ("\\lbrace", "\\{"),
        ("\\rbrace", "\\}"),
        ("\\lvert", "|"),
        ("\\rvert", "|"),
        ("\\le", "\\leq"),
        ("\\ge", "\\geq"),
        ("\\neq", "\\ne"),
        ("\\degree", ""),
        ("\\circ", ""),
        ("\\percent", ""),
        ("\\infinity", "\\infty"),
        ("\\inf", "\\infty"),
        ("\\quad", ""),
        ("\\qquad", ""),
        ("\\bigl", ""),
        ("\\bigr", ""),
        ("\\Bigl", ""),
        ("\\Bigr", ""),
        ("\\big", ""),
        ("\\Big", ""),
    ] {
        s = replace_cmd(&s, &from[1..], to);
    }
    // `\left.` closes nothing; `\left(` is just `(`.
    s = s.replace("\\left.", "").replace("\\right.", "");
    s = replace_cmd(&s, "left", "");
    s = replace_cmd(&s, "right", "");
    for spacing in ["\\!", "\\,", "\\;", "\\:", "\\ ", "~"] {
        s = s.replace(spacing, "");
    }
    for mark in ["\\%", "%", "\\$", "$"] {
        s = s.replace(mark, "");
    }
    s = s.replace("^{}", "");
    s = unwrap_text(&s);
    s = drop_unit_words(&s);
    let mut s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    // Degrees: `30^\circ` lost its `\circ` above, leaving `30^` or `30^{}`.
    s = s.replace("^{}", "");
    while s.ends_with('^') || s.ends_with('.') {
        s.pop();
    }
    s = strip_prefix(&s);
    s = brace_single_scripts(&s);
    let t = strip_outer_braces(&s).to_string();
    // `(C)` as a multiple-choice label is just `C`.
    if t.len() == 3
        && t.starts_with('(')
        && t.ends_with(')')
        && t.as_bytes()[1].is_ascii_alphabetic()
    {
        return t[1..2].to_string();
    }
    t.replace(ROW_BREAK, "\\\\")
}

/// `√51` → `\sqrt{51}`: the Unicode root of a run of digits takes them all.
fn unicode_roots(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{221a}' || !chars.peek().is_some_and(char::is_ascii_digit) {
            out.push(c);
            continue;
        }
        out.push_str("\\sqrt{");
        while let Some(d) = chars.next_if(char::is_ascii_digit) {
            out.push(d);
        }
        out.push('}');
    }
    out
}

/// `3, 5, \text{ and } 7` / `1 and -2` → `3, 5, 7` / `1, -2`: a list of numbers written with
/// "and" or "or" is the list (only where the answer has a digit, so words stay words).
fn lists_in_words(s: &str) -> String {
    if !s.contains(|c: char| c.is_ascii_digit()) {
        return s.to_string();
    }
    let before = s.to_string();
    let mut s = before.clone();
    for w in ["and", "or"] {
        for pat in [
            format!("\\text{{ {w} }}"),
            format!("\\text{{{w} }}"),
            format!("\\text{{ {w}}}"),
            format!("\\text{{{w}}}"),
        ] {
            s = s.replace(&pat, &format!(" {w} "));
        }
        s = s.replace(&format!(" {w} "), ",");
    }
    if s == before {
        return s;
    }
    // `3, 5, and 7` left an empty item between two commas.
    let items: Vec<&str> = s.split(',').filter(|i| !i.trim().is_empty()).collect();
    items.join(",")
}

/// Whether `s` names what its value is given for: `q(x)`, `(a,b)`, `(r,\theta)` — identifiers
/// (a letter or a `\command`), an optional name before one parenthesised list of them.
fn is_name(s: &str) -> bool {
    fn ident(t: &str) -> bool {
        match t.strip_prefix('\\') {
            Some(cmd) => !cmd.is_empty() && cmd.chars().all(|c| c.is_ascii_alphabetic()),
            None => t.len() == 1 && t.chars().all(|c| c.is_ascii_alphabetic()),
        }
    }
    let (head, args) = match s.find('(') {
        Some(i) if s.ends_with(')') => (&s[..i], Some(&s[i + 1..s.len() - 1])),
        Some(_) => return false,
        None => (s, None),
    };
    (head.is_empty() || ident(head))
        && args.is_none_or(|a| a.split(',').all(ident))
        && !(head.is_empty() && args.is_none())
}

/// Strips `x=` / `\theta=` / `x\in` in front of a value (the value is the answer), but not the
/// left side of an equation whose right side also has an `=`. Also a name with arguments or a
/// tuple of names (`q(x)=`, `(a,b)=`), and worked arithmetic (`20-5=15`: the result).
fn strip_prefix(s: &str) -> String {
    if let Some((left, right)) = s.split_once('=') {
        let worked = !left.is_empty()
            && crate::eval::math_eval::evaluate(left).is_some()
            && !crate::eval::math_eval::has_variables(left);
        if !right.is_empty() && !right.contains('=') && (is_name(left) || worked) {
            return right.to_string();
        }
    }
    let ident_len = if let Some(name) = s.strip_prefix('\\') {
        1 + name
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(name.len())
    } else if s.starts_with(|c: char| c.is_ascii_alphabetic()) {
        1
    } else {
        return s.to_string();
    };
    let rest = &s[ident_len..];
    for op in ["=", "\\in"] {
        if let Some(v) = rest.strip_prefix(op) {
            if !v.is_empty() && !v.contains('=') {
                return v.to_string();
            }
        }
    }
    s.to_string()
}

/// `^{2}` → `^2`, `_{5}` → `_5`: one-character scripts written two ways.
fn brace_single_scripts(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if (chars[i] == '^' || chars[i] == '_')
            && chars.get(i + 1) == Some(&'{')
            && chars.get(i + 3) == Some(&'}')
            && chars.get(i + 2).is_some_and(|c| c.is_ascii_alphanumeric())
        {
            out.push(chars[i]);
            out.push(chars[i + 2]);
            i += 4;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn normalises_common_forms() {
        assert_eq!(
            normalize("\\left( 3, \\dfrac{\\pi}{2} \\right)"),
            "(3,\\frac{\\pi}{2})"
        );
        assert_eq!(normalize("90^\\circ"), "90");
        assert_eq!(normalize("\\frac{270}7\\text{ degrees}"), "\\frac{270}7");
        assert_eq!(normalize("864 \\mbox{ inches}^2"), "864");
        assert_eq!(normalize("\\text{Evelyn}"), "Evelyn");
        assert_eq!(normalize("\\text{(C)}"), "C");
        assert_eq!(normalize("10,\\!080"), "10,080");
        assert_eq!(normalize("\\$32,\\!348"), "32,348");
        assert_eq!(normalize("x = 5."), "5");
        assert_eq!(normalize("x \\in [-2,7]"), "[-2,7]");
        assert_eq!(normalize("4210_{5}"), "4210_5");
        assert_eq!(normalize("5.4 \\text{ cents}"), "5.4");
        assert_eq!(normalize("18 dollars"), "18");
        assert_eq!(normalize("50\\%"), "50");
        assert_eq!(normalize("y = 2x + 3"), "2x+3");
        assert_eq!(normalize("5x - 7y + 11z + 4 = 0"), "5x-7y+11z+4=0");
        assert_eq!(normalize("{5}"), "5");
    }
}
