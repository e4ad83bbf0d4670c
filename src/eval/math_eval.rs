//! A small evaluator for normalised LaTeX answers: numbers, `+ - * /`, `\cdot`, `\times`, `\div`,
//! powers, `\frac`, `\sqrt` (and `\sqrt[n]`), `\pi`, `\infty`, the imaginary unit `i`, `!`,
//! `\binom`, a few functions and single-letter variables, to complex f64.
//!
//! Why complex: MATH answers such as `6-5i` must compare equal to `-5i+6`. Why variables: answers
//! such as `(a+5)(b+2)` or `x^3+3x-6` are compared by evaluating both sides at a few fixed points
//! (a polynomial identity test), so reordered or expanded forms of the same expression match.
//! Letter runs are products of variables (`ab`); words are told apart from expressions before
//! this point (`math_equiv` compares two words as text). Anything the grammar does not cover
//! (subscripts, unknown commands, `=`) fails to evaluate, and the caller falls back to strings.

/// A complex number; answers are almost always real, so real-only paths avoid `inf * 0 = NaN`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Complex {
    pub re: f64,
    pub im: f64,
}

impl Complex {
    pub fn real(re: f64) -> Self {
        Complex { re, im: 0.0 }
    }
    fn is_real(self) -> bool {
        self.im == 0.0
    }
    fn neg(self) -> Self {
        Complex {
            re: -self.re,
            im: -self.im,
        }
    }
    fn add(self, o: Self) -> Self {
        if self.is_real() && o.is_real() {
            return Complex::real(self.re + o.re);
        }
        Complex {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
    fn sub(self, o: Self) -> Self {
        self.add(o.neg())
    }
    fn mul(self, o: Self) -> Self {
        if self.is_real() && o.is_real() {
            return Complex::real(self.re * o.re);
        }
        Complex {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    fn div(self, o: Self) -> Self {
        if self.is_real() && o.is_real() {
            return Complex::real(self.re / o.re);
        }
        let d = o.re * o.re + o.im * o.im;
        Complex {
            re: (self.re * o.re + self.im * o.im) / d,
            im: (self.im * o.re - self.re * o.im) / d,
        }
    }
    fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }
    fn ln(self) -> Self {
        Complex {
            re: self.abs().ln(),
            im: self.im.atan2(self.re),
        }
    }
    fn exp(self) -> Self {
        let r = self.re.exp();
        if self.is_real() {
            return Complex::real(r);
        }
        Complex {
            re: r * self.im.cos(),
            im: r * self.im.sin(),
        }
    }
    fn sqrt(self) -> Self {
        if self.is_real() && self.re >= 0.0 {
            return Complex::real(self.re.sqrt());
        }
        let r = self.abs();
        let re = ((r + self.re) / 2.0).sqrt();
        let im = ((r - self.re) / 2.0).sqrt();
        Complex {
            re,
            im: if self.im < 0.0 { -im } else { im },
        }
    }
    fn pow(self, e: Self) -> Self {
        // Integer exponents by repeated multiplication keep `(\sqrt2)^2` and `i^2` exact enough.
        if e.is_real() && e.re.fract() == 0.0 && e.re.abs() <= 64.0 {
            let n = e.re.abs() as u32;
            let mut acc = Complex::real(1.0);
            for _ in 0..n {
                acc = acc.mul(self);
            }
            return if e.re < 0.0 {
                Complex::real(1.0).div(acc)
            } else {
                acc
            };
        }
        if self.is_real() && e.is_real() && self.re >= 0.0 {
            return Complex::real(self.re.powf(e.re));
        }
        if self.re == 0.0 && self.im == 0.0 {
            return Complex::real(0.0);
        }
        e.mul(self.ln()).exp()
    }
    fn sin(self) -> Self {
        Complex {
            re: self.re.sin() * self.im.cosh(),
            im: self.re.cos() * self.im.sinh(),
        }
    }
    fn cos(self) -> Self {
        Complex {
            re: self.re.cos() * self.im.cosh(),
            im: -self.re.sin() * self.im.sinh(),
        }
    }
}

/// Relative tolerance for two evaluated answers. f64 evaluation of a short expression of radicals
/// and fractions is exact to about 1e-15 relative; 1e-9 leaves a wide margin for that rounding
/// while still separating any two answers that differ in their ninth significant digit.
pub const REL_TOL: f64 = 1e-9;
/// Absolute floor so that `\sqrt2\cdot\sqrt2-2` (about 4e-16) still equals `0`.
pub const ABS_TOL: f64 = 1e-12;

/// Whether two values are equal within `ABS_TOL + REL_TOL·max(|a|,|b|)`; infinities must match.
pub fn close(a: Complex, b: Complex) -> bool {
    let parts = [a.re, a.im, b.re, b.im];
    if parts.iter().any(|v| v.is_nan()) {
        return false;
    }
    if parts.iter().any(|v| v.is_infinite()) {
        return a.re == b.re && (a.im == b.im || (a.im.is_finite() && b.im.is_finite()));
    }
    let diff = a.sub(b).abs();
    diff <= ABS_TOL + REL_TOL * a.abs().max(b.abs())
}

/// Number of variable assignments an expression is evaluated at.
pub const TRIALS: usize = 3;

/// The value a variable letter takes in trial `t`: distinct per letter and per trial, and not
/// small integers, so that `x^2` and `x` or `ab` and `a+b` cannot agree by coincidence.
fn var_value(c: char, t: usize) -> Complex {
    let idx = if c.is_ascii_lowercase() {
        c as u32 - 'a' as u32
    } else {
        26 + c as u32 - 'A' as u32
    } as f64;
    Complex::real(1.0 + idx * 0.1371 + t as f64 * (0.531 + idx * 0.0173))
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// A decimal literal, kept as text so that `\frac12` can take its first digit only.
    Num(String),
    Var(char),
    Cmd(&'static str),
    Sym(char),
}

/// LaTeX commands the evaluator knows. `\cotx` (spaces already removed) splits as `\cot` + `x`.
const COMMANDS: &[&str] = &[
    "frac", "sqrt", "pi", "infty", "cdot", "times", "div", "sin", "cos", "tan", "cot", "sec",
    "csc", "ln", "log", "exp", "binom",
];

/// Deepest bracket nesting evaluated; the parser recurses per level, so runaway input is refused.
const MAX_DEPTH: usize = 64;

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut depth = 0usize;
    for c in &chars {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_DEPTH {
            return None;
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            let mut seen_dot = false;
            while i < chars.len() && (chars[i].is_ascii_digit() || (chars[i] == '.' && !seen_dot)) {
                seen_dot |= chars[i] == '.';
                i += 1;
            }
            out.push(Tok::Num(chars[start..i].iter().collect()));
        } else if c == '\\' {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && chars[end].is_ascii_alphabetic() {
                end += 1;
            }
            let word: String = chars[start..end].iter().collect();
            let cmd = COMMANDS
                .iter()
                .filter(|k| word.starts_with(*k))
                .max_by_key(|k| k.len())?;
            out.push(Tok::Cmd(cmd));
            // Letters after the command name were separate variables before spaces were removed.
            i = start + cmd.len();
        } else if c.is_ascii_alphabetic() {
            out.push(Tok::Var(c));
            i += 1;
        } else if "+-*/^()[]{}!".contains(c) {
            out.push(Tok::Sym(c));
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    trial: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn eat_sym(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Sym(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// sum := ['+'|'-'] product (('+'|'-') product)*
    fn sum(&mut self) -> Option<Complex> {
        let mut acc = if self.eat_sym('-') {
            self.product()?.neg()
        } else {
            self.eat_sym('+');
            self.product()?
        };
        loop {
            if self.eat_sym('+') {
                acc = acc.add(self.product()?);
            } else if self.eat_sym('-') {
                acc = acc.sub(self.product()?);
            } else {
                return Some(acc);
            }
        }
    }

    /// product := factor ((op | implicit) factor)*, with `1\frac45` read as a mixed number.
    fn product(&mut self) -> Option<Complex> {
        let first_is_int = matches!(self.peek(), Some(Tok::Num(t)) if !t.contains('.'));
        let start = self.pos;
        let mut acc = self.factor()?;
        // Only a bare integer literal starts a mixed number (`2^3\frac12` is a product).
        if first_is_int && self.pos == start + 1 && self.peek() == Some(&Tok::Cmd("frac")) {
            if let Some(frac) = self.integer_frac() {
                acc = acc.add(frac);
            }
        }
        loop {
            match self.peek() {
                Some(Tok::Sym('*')) | Some(Tok::Cmd("cdot")) | Some(Tok::Cmd("times")) => {
                    self.pos += 1;
                    acc = acc.mul(self.factor()?);
                }
                Some(Tok::Sym('/')) | Some(Tok::Cmd("div")) => {
                    self.pos += 1;
                    acc = acc.div(self.factor()?);
                }
                Some(Tok::Num(_)) | Some(Tok::Var(_)) | Some(Tok::Sym('('))
                | Some(Tok::Sym('{')) => {
                    acc = acc.mul(self.factor()?);
                }
                Some(Tok::Cmd(c)) if !matches!(*c, "cdot" | "times" | "div") => {
                    acc = acc.mul(self.factor()?);
                }
                _ => return Some(acc),
            }
        }
    }

    /// `\frac{int}{int}` right after an integer (a mixed number); on any other shape, rewinds.
    fn integer_frac(&mut self) -> Option<Complex> {
        let (save_pos, save_toks) = (self.pos, self.toks.clone());
        self.pos += 1;
        let r = (|| {
            let a = self.int_arg()?;
            let b = self.int_arg()?;
            Some(Complex::real(a / b))
        })();
        if r.is_none() {
            self.pos = save_pos;
            self.toks = save_toks;
        }
        r
    }

    fn int_arg(&mut self) -> Option<f64> {
        if self.eat_sym('{') {
            let v = match self.peek()? {
                Tok::Num(t) if !t.contains('.') => t.parse().ok()?,
                _ => return None,
            };
            self.pos += 1;
            return self.eat_sym('}').then_some(v);
        }
        match self.peek()? {
            Tok::Num(t) if t.as_bytes()[0].is_ascii_digit() => {
                let v = f64::from(t.as_bytes()[0] - b'0');
                self.split_first_char();
                Some(v)
            }
            _ => None,
        }
    }

    /// Consumes the first character of a number token (`\frac12`: the `1`), leaving the rest.
    fn split_first_char(&mut self) {
        if let Some(Tok::Num(t)) = self.toks.get(self.pos).cloned() {
            if t.len() > 1 {
                self.toks[self.pos] = Tok::Num(t[1..].to_string());
            } else {
                self.pos += 1;
            }
        }
    }

    /// factor := '-' factor | power
    fn factor(&mut self) -> Option<Complex> {
        if self.eat_sym('-') {
            return Some(self.factor()?.neg());
        }
        self.power()
    }

    /// power := atom ['!'] ['^' arg]
    fn power(&mut self) -> Option<Complex> {
        let mut base = self.atom()?;
        if self.eat_sym('!') {
            base = factorial(base)?;
        }
        if self.eat_sym('^') {
            let negative = self.eat_sym('-');
            let e = self.arg()?;
            base = base.pow(if negative { e.neg() } else { e });
        }
        Some(base)
    }

    /// A LaTeX macro argument: `{expr}`, one digit, one letter or one command atom.
    fn arg(&mut self) -> Option<Complex> {
        match self.peek()?.clone() {
            Tok::Sym('{') => {
                self.pos += 1;
                let v = self.sum()?;
                self.eat_sym('}').then_some(v)
            }
            Tok::Num(t) => {
                let first = t.chars().next()?;
                if first == '.' {
                    return None;
                }
                self.split_first_char();
                Some(Complex::real(f64::from(first.to_digit(10)?)))
            }
            _ => self.atom(),
        }
    }

    fn atom(&mut self) -> Option<Complex> {
        let tok = self.peek()?.clone();
        self.pos += 1;
        match tok {
            Tok::Num(t) => t.parse().ok().map(Complex::real),
            Tok::Var('i') => Some(Complex { re: 0.0, im: 1.0 }),
            Tok::Var(c) => Some(var_value(c, self.trial)),
            Tok::Sym('(') => {
                let v = self.sum()?;
                self.eat_sym(')').then_some(v)
            }
            Tok::Sym('{') => {
                let v = self.sum()?;
                self.eat_sym('}').then_some(v)
            }
            Tok::Cmd("pi") => Some(Complex::real(std::f64::consts::PI)),
            Tok::Cmd("infty") => Some(Complex::real(f64::INFINITY)),
            Tok::Cmd("frac") => {
                let a = self.arg()?;
                let b = self.arg()?;
                Some(a.div(b))
            }
            Tok::Cmd("binom") => {
                let n = self.arg()?;
                let k = self.arg()?;
                binom(n, k)
            }
            Tok::Cmd("sqrt") => {
                if self.eat_sym('[') {
                    let n = self.sum()?;
                    if !self.eat_sym(']') {
                        return None;
                    }
                    let x = self.arg()?;
                    // An odd root of a negative real is the real root, as in school algebra.
                    if x.is_real()
                        && x.re < 0.0
                        && n.is_real()
                        && n.re.fract() == 0.0
                        && n.re as i64 % 2 != 0
                    {
                        return Some(Complex::real(-(-x.re).powf(1.0 / n.re)));
                    }
                    return Some(x.pow(Complex::real(1.0).div(n)));
                }
                Some(self.arg()?.sqrt())
            }
            Tok::Cmd(f) => {
                // `\sin^2x` is rare in answers; `\sin x`, `\sin(x)` and `\sin{x}` are handled.
                let x = if self.peek() == Some(&Tok::Sym('(')) {
                    self.atom()?
                } else {
                    self.power()?
                };
                apply(f, x)
            }
            _ => None,
        }
    }
}

fn apply(f: &str, x: Complex) -> Option<Complex> {
    let one = Complex::real(1.0);
    Some(match f {
        "sin" => x.sin(),
        "cos" => x.cos(),
        "tan" => x.sin().div(x.cos()),
        "cot" => x.cos().div(x.sin()),
        "sec" => one.div(x.cos()),
        "csc" => one.div(x.sin()),
        "ln" => x.ln(),
        "log" => x.ln().div(Complex::real(std::f64::consts::LN_10)),
        "exp" => x.exp(),
        _ => return None,
    })
}

fn factorial(x: Complex) -> Option<Complex> {
    if !x.is_real() || x.re < 0.0 || x.re.fract() != 0.0 || x.re > 170.0 {
        return None;
    }
    Some(Complex::real((1..=x.re as u64).map(|k| k as f64).product()))
}

fn binom(n: Complex, k: Complex) -> Option<Complex> {
    if !n.is_real() || !k.is_real() || k.re < 0.0 || k.re.fract() != 0.0 || k.re > 170.0 {
        return None;
    }
    let mut acc = 1.0;
    for j in 0..k.re as u64 {
        acc = acc * (n.re - j as f64) / (j as f64 + 1.0);
    }
    Some(Complex::real(acc))
}

/// Evaluates a normalised answer at `TRIALS` variable assignments, or `None` when the text is not
/// an expression this grammar covers (or evaluates to NaN).
pub fn evaluate(s: &str) -> Option<Vec<Complex>> {
    let toks = tokenize(s)?;
    if toks.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(TRIALS);
    for trial in 0..TRIALS {
        let mut p = Parser {
            toks: toks.clone(),
            pos: 0,
            trial,
        };
        let v = p.sum()?;
        if p.pos != p.toks.len() || v.re.is_nan() || v.im.is_nan() {
            return None;
        }
        out.push(v);
    }
    Some(out)
}

/// Whether the text names any variable (a letter other than the imaginary unit).
pub fn has_variables(s: &str) -> bool {
    tokenize(s).is_some_and(|t| t.iter().any(|k| matches!(k, Tok::Var(c) if *c != 'i')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(s: &str) -> f64 {
        let v = evaluate(s).unwrap_or_else(|| panic!("{s} did not evaluate"));
        assert_eq!(v[0].im, 0.0, "{s}");
        v[0].re
    }

    #[test]
    fn evaluates_latex_numbers() {
        assert_eq!(val("\\frac12"), 0.5);
        assert_eq!(val("\\frac{270}7"), 270.0 / 7.0);
        assert_eq!(val("\\frac9{19}"), 9.0 / 19.0);
        assert_eq!(val("1\\frac{4}{5}"), 1.8);
        assert_eq!(val("-1\\frac45"), -1.8);
        assert_eq!(val("2\\sqrt3"), 2.0 * 3f64.sqrt());
        assert_eq!(val("\\sqrt23"), 3.0 * 2f64.sqrt());
        assert_eq!(val("x^23"), val("3x^2"));
        assert_eq!(val("10^{-2}"), 0.01);
        assert_eq!(val("5!"), 120.0);
        assert_eq!(val("\\sqrt[3]{-8}"), -2.0);
        assert_eq!(val(".35625"), 0.35625);
        assert_eq!(val("-\\infty"), f64::NEG_INFINITY);
        assert!((val("\\cotx") - 1.0 / (val("x")).tan()).abs() < 1e-12);
    }

    #[test]
    fn complex_and_words() {
        let v = evaluate("6-5i").unwrap();
        assert_eq!((v[0].re, v[0].im), (6.0, -5.0));
        assert!(evaluate("52_8").is_none());
        assert!(evaluate("\\foo").is_none());
        assert!(evaluate("(1+2").is_none());
    }
}
