//! Equivalence of two normalised MATH answers: matrices cell by cell, unions and sets and bare
//! lists as multisets, tuples and intervals element by element with matching brackets, `\pm` as
//! both signs, equations up to a constant factor, and scalars by value (`math_eval`), falling back
//! to string equality for whatever does not evaluate (words, subscripted bases, `\cot x` forms).

use super::math_eval::{close, evaluate};
use super::math_norm::normalize;

/// Longest normalised answer compared structurally (MATH-500's longest is under 100 characters).
const MAX_ANSWER_LEN: usize = 1000;

/// Splits at top-level occurrences of `sep`; `(`/`[`/`{` open and `)`/`]`/`}` close regardless of
/// kind, because an interval such as `(1,2]` pairs different brackets.
fn split_top(s: &str, sep: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth == 0 && bytes[i..].starts_with(sep.as_bytes()) {
            parts.push(s[start..i].to_string());
            i += sep.len();
            start = i;
            continue;
        }
        i += 1;
    }
    parts.push(s[start..].to_string());
    parts
}

/// `(inner)` / `[inner)` etc. when the first bracket closes at the last character.
fn bracketed(s: &str) -> Option<(char, &str, char)> {
    let open = s.chars().next()?;
    let close = s.chars().last()?;
    if !matches!(open, '(' | '[') || !matches!(close, ')' | ']') || s.len() < 2 {
        return None;
    }
    let mut depth = 0i32;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 && i != s.len() - 1 {
                    return None;
                }
            }
            _ => {}
        }
    }
    Some((open, &s[1..s.len() - 1], close))
}

/// `\{a,b\}` → its elements.
fn set_elements(s: &str) -> Option<Vec<String>> {
    let inner = s.strip_prefix("\\{")?.strip_suffix("\\}")?;
    Some(split_top(inner, ","))
}

/// `\begin{pmatrix}a\\b\end{pmatrix}` → rows of cells.
fn matrix(s: &str) -> Option<Vec<Vec<String>>> {
    for env in ["pmatrix", "bmatrix", "matrix", "vmatrix"] {
        let begin = format!("\\begin{{{env}}}");
        let end = format!("\\end{{{env}}}");
        if let Some(inner) = s.strip_prefix(&begin).and_then(|r| r.strip_suffix(&end)) {
            let rows = inner
                .split("\\\\")
                .filter(|r| !r.is_empty())
                .map(|r| r.split('&').map(str::to_string).collect())
                .collect();
            return Some(rows);
        }
    }
    None
}

/// `11,111,111,100` (comma-grouped thousands) → `11111111100`.
fn ungroup_thousands(s: &str) -> Option<String> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => (i, Some(f)),
        Some(_) => return None,
        None => (body, None),
    };
    let groups: Vec<&str> = int.split(',').collect();
    let ok = groups.len() >= 2
        && (1..=3).contains(&groups[0].len())
        && groups[1..].iter().all(|g| g.len() == 3)
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return None;
    }
    let mut out = String::new();
    if s.starts_with('-') {
        out.push('-');
    }
    out.push_str(&groups.concat());
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    Some(out)
}

/// `a\pm b` → `[a+b, a-b]` (first top-level `\pm`/`\mp` only; more is rare in answers).
fn expand_pm(s: &str) -> Option<Vec<String>> {
    for (pm, first, second) in [("\\pm", "+", "-"), ("\\mp", "-", "+")] {
        let parts = split_top(s, pm);
        if parts.len() == 2 {
            return Some(vec![
                format!("{}{first}{}", parts[0], parts[1]),
                format!("{}{second}{}", parts[0], parts[1]),
            ]);
        }
    }
    None
}

/// The elements of an unordered answer (a set, a bare comma list, a `\pm` pair), each `\pm`
/// element expanded, each `x=` prefix dropped.
fn unordered(s: &str) -> Option<Vec<String>> {
    let items = if let Some(e) = set_elements(s) {
        e
    } else if bracketed(s).is_none() && ungroup_thousands(s).is_none() {
        let parts = split_top(s, ",");
        if parts.len() >= 2 {
            parts
        } else {
            expand_pm(s)?
        }
    } else {
        return None;
    };
    let mut out = Vec::new();
    for item in items {
        let item = normalize(&item);
        match expand_pm(&item) {
            Some(pair) => out.extend(pair),
            None => out.push(item),
        }
    }
    Some(out)
}

/// Whether every element of `a` pairs with a distinct equivalent element of `b`.
fn multiset_equal(a: &[String], b: &[String]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut used = vec![false; b.len()];
    a.iter().all(|x| {
        let hit = (0..b.len()).find(|&j| !used[j] && equivalent_norm(x, &b[j]));
        hit.map(|j| used[j] = true).is_some()
    })
}

/// Whether the normalised strings hold words only (compared case-insensitively).
fn is_text(s: &str) -> bool {
    s.chars().filter(|c| c.is_ascii_alphabetic()).count() >= 2
        && s.chars()
            .all(|c| c.is_ascii_alphabetic() || "()-' ".contains(c))
}

/// Two equations `l1=r1`, `l2=r2` are the same when `l1-r1 = c·(l2-r2)` at every trial point.
fn equations_equal(a: &str, b: &str) -> Option<bool> {
    let (la, ra) = a.split_once('=')?;
    let (lb, rb) = b.split_once('=')?;
    if ra.contains('=') || rb.contains('=') {
        return None;
    }
    let fa = evaluate(&format!("({la})-({ra})"))?;
    let fb = evaluate(&format!("({lb})-({rb})"))?;
    let ratio = |i: usize| -> Option<f64> {
        (fb[i].re.abs() > 1e-12 && fa[i].im == 0.0 && fb[i].im == 0.0).then(|| fa[i].re / fb[i].re)
    };
    let c0 = ratio(0)?;
    Some((1..fa.len()).all(|i| {
        ratio(i).is_some_and(|c| {
            close(
                super::math_eval::Complex::real(c),
                super::math_eval::Complex::real(c0),
            )
        })
    }))
}

/// Equivalence of two already-normalised answers.
pub fn equivalent_norm(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    // Answers are short; a long box is runaway text, not worth parsing (and bounds recursion).
    if a.is_empty() || b.is_empty() || a.len() > MAX_ANSWER_LEN || b.len() > MAX_ANSWER_LEN {
        return false;
    }
    if is_text(a) && is_text(b) {
        return a.eq_ignore_ascii_case(b);
    }
    let (a, b) = (
        ungroup_thousands(a).unwrap_or_else(|| a.to_string()),
        ungroup_thousands(b).unwrap_or_else(|| b.to_string()),
    );
    let (a, b) = (a.as_str(), b.as_str());
    match (matrix(a), matrix(b)) {
        (Some(ma), Some(mb)) => {
            return ma.len() == mb.len()
                && ma.iter().zip(&mb).all(|(ra, rb)| {
                    ra.len() == rb.len() && ra.iter().zip(rb).all(|(x, y)| equivalent(x, y))
                });
        }
        (None, None) => {}
        _ => return false,
    }
    let (ua, ub) = (split_top(a, "\\cup"), split_top(b, "\\cup"));
    if ua.len() > 1 || ub.len() > 1 {
        return multiset_equal(&ua, &ub);
    }
    match (bracketed(a), bracketed(b)) {
        (Some((oa, ia, ca)), Some((ob, ib, cb))) => {
            let (ea, eb) = (split_top(ia, ","), split_top(ib, ","));
            if ea.len() >= 2 || eb.len() >= 2 {
                // Tuples and intervals: same brackets, same length, element by element.
                return oa == ob
                    && ca == cb
                    && ea.len() == eb.len()
                    && ea.iter().zip(&eb).all(|(x, y)| equivalent(x, y));
            }
        }
        (Some((_, ia, _)), None) | (None, Some((_, ia, _))) if split_top(ia, ",").len() >= 2 => {
            return false;
        }
        _ => {}
    }
    match (unordered(a), unordered(b)) {
        (Some(xa), Some(xb)) => return multiset_equal(&xa, &xb),
        (None, None) => {}
        _ => return false,
    }
    if a.contains('=') || b.contains('=') {
        return equations_equal(a, b).unwrap_or(false);
    }
    match (evaluate(a), evaluate(b)) {
        (Some(va), Some(vb)) => va.iter().zip(&vb).all(|(x, y)| close(*x, *y)),
        _ => false,
    }
}

/// Equivalence of two raw answers (normalised first).
pub fn equivalent(a: &str, b: &str) -> bool {
    equivalent_norm(&normalize(a), &normalize(b))
}

#[cfg(test)]
mod tests {
    use super::equivalent;

    #[test]
    fn structures() {
        assert!(equivalent("(1,2]", "\\left(1, 2\\right]"));
        assert!(!equivalent("(1,2]", "[1,2]"));
        assert!(equivalent(
            "\\{1\\pm\\sqrt{5},-2\\}",
            "-2, 1-\\sqrt5, 1+\\sqrt5"
        ));
        assert!(equivalent("1 \\pm \\sqrt{19}", "1+\\sqrt{19},1-\\sqrt{19}"));
        assert!(equivalent("10,\\!080", "10080"));
        assert!(equivalent("5x - 7y + 11z + 4 = 0", "-10x+14y-22z-8=0"));
        assert!(!equivalent("5x - 7y + 11z + 4 = 0", "5x-7y+11z-4=0"));
        assert!(equivalent(
            "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
            "\\begin{pmatrix}-\\frac13\\\\\\frac23\\\\\\frac53\\end{pmatrix}"
        ));
        assert!(equivalent("(-\\infty, 0]", "(-\\infty,0]"));
        assert!(equivalent("(0,9) \\cup (9,36)", "(9,36)\\cup(0,9)"));
    }
}
