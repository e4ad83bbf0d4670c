//! The grader's table of cases (reference, response, expected extraction, expected verdict) for
//! both GSM8K and MATH, many of which must NOT match, plus checks over the real GSM8K and
//! MATH-500 files when `../shared/data/` (or `/work/shared/data`) holds them.

use std::path::PathBuf;

use thinksteer::eval::dataset::{load_dataset, DatasetKind};
use thinksteer::eval::grade::{grade, GradeKind};
use thinksteer::eval::math_equiv::equivalent;
use thinksteer::eval::math_eval::{evaluate, has_variables};
use thinksteer::eval::math_norm::normalize;

use GradeKind::{Gsm8k as G, Math as M};

/// (kind, reference, response, expected extracted, expected correct).
type Case = (
    GradeKind,
    &'static str,
    &'static str,
    Option<&'static str>,
    bool,
);

const CASES: &[Case] = &[
    // ---- GSM8K: extraction of the final number ----
    (G, "18", "She makes 9 * 2 = $18 every day.\n#### 18", Some("18"), true),
    (G, "18", "So the total is $18.", Some("18"), true),
    (G, "1450000", "The house costs $1,450,000.", Some("1450000"), true),
    (G, "1,450,000", "#### 1450000", Some("1450000"), true),
    (G, "-3", "The temperature dropped to -3 degrees.", Some("-3"), true),
    (G, "3", "16 - 3 - 4 = 9 eggs, then 9 - 6 = 3.", Some("3"), true),
    (G, "18", "The answer is 18.0", Some("18"), true),
    (G, "18", "The answer is $18.00 per day.", Some("18"), true),
    (G, "5", "The answer is 5. We computed 2 + 3 along the way.", Some("5"), true),
    (G, "5", "Some 4 steps.\n\\boxed{5}", Some("5"), true),
    (G, "5", "The answer is 4.\nWait, recheck: \\boxed{5}", Some("5"), true),
    (G, "4.5", "\\boxed{\\frac{9}{2}}", Some("4.5"), true),
    (G, "25", "That is 25% of the class.", Some("25"), true),
    (G, "70", "Answer: 70 apples", Some("70"), true),
    (G, "7", "<think>maybe 9</think>Final answer: 7", Some("7"), true),
    (G, "10800", "#### 10,800", Some("10800"), true),
    (G, "0.5", "It takes .5 hours.", Some("0.5"), true),
    (G, "12", "12 is the count after we add 1 and 1 to 10.", Some("10"), false),
    (G, "12", "The answer is 120.", Some("120"), false),
    (G, "120", "The answer is 12.", Some("12"), false),
    (G, "3", "The answer is -3.", Some("-3"), false),
    (G, "-3", "So it ends at 3.", Some("3"), false),
    (G, "18", "#### 17", Some("17"), false),
    (G, "18", "The answer is 18.5", Some("18.5"), false),
    (G, "1450000", "The house costs $1,450,001.", Some("1450001"), false),
    (G, "18", "I do not know.", None, false),
    (G, "9", "<think>the answer is 9</think>So it is 8.", Some("8"), false),
    (G, "5", "The answer is 5 hmm no.\n#### 6", Some("6"), false),
    (G, "2", "1,2", Some("2"), true),
    (G, "100", "10 0", Some("0"), false),
    // ---- MATH: extraction ----
    (M, "\\frac{14}{3}", "Thus $x = \\boxed{\\frac{14}{3}}$.", Some("\\frac{14}{3}"), true),
    (M, "\\frac{14}{3}", "\\boxed{\\dfrac{14}{3}}", Some("\\dfrac{14}{3}"), true),
    (M, "\\frac{14}{3}", "\\boxed{14/3}", Some("14/3"), true),
    (M, "\\frac{14}{3}", "\\fbox{\\tfrac{14}{3}}", Some("\\tfrac{14}{3}"), true),
    (M, "\\frac{14}{3}", "\\boxed{4.6667}", Some("4.6667"), false),
    (M, "\\frac{1}{2}", "\\boxed{0.5}", Some("0.5"), true),
    (M, "\\frac{1}{2}", "\\boxed{0.49}", Some("0.49"), false),
    (M, "\\frac{1}{2}", "\\boxed{\\frac12}", Some("\\frac12"), true),
    (M, "\\frac{1}{2}", "\\boxed{\\frac21}", Some("\\frac21"), false),
    (M, "\\frac 59", "\\boxed{\\frac{5}{9}}", Some("\\frac{5}{9}"), true),
    (M, "\\frac9{19}", "\\boxed{9/19}", Some("9/19"), true),
    (M, "-\\frac{35}{9}", "\\boxed{-\\frac{35}{9}}", Some("-\\frac{35}{9}"), true),
    (M, "-\\frac{35}{9}", "\\boxed{\\frac{-35}{9}}", Some("\\frac{-35}{9}"), true),
    (M, "-\\frac{35}{9}", "\\boxed{\\frac{35}{9}}", Some("\\frac{35}{9}"), false),
    (M, "1\\frac{4}{5}", "\\boxed{\\frac{9}{5}}", Some("\\frac{9}{5}"), true),
    (M, "137 \\frac{1}{2}", "\\boxed{137.5}", Some("137.5"), true),
    (M, "1.25", "\\boxed{\\frac54}", Some("\\frac54"), true),
    (M, ".0000672", "\\boxed{6.72 \\times 10^{-5}}", Some("6.72 \\times 10^{-5}"), true),
    (M, ".35625", "\\boxed{0.35625}", Some("0.35625"), true),
    (M, "12", "\\boxed{120}", Some("120"), false),
    (M, "12", "\\boxed{12.0}", Some("12.0"), true),
    (M, "-50", "\\boxed{50}", Some("50"), false),
    (M, "10,\\!080", "\\boxed{10080}", Some("10080"), true),
    (M, "10,\\!080", "\\boxed{10,080}", Some("10,080"), true),
    (M, "11,\\! 111,\\! 111,\\! 100", "\\boxed{11111111100}", Some("11111111100"), true),
    (M, "58,500", "\\boxed{58500}", Some("58500"), true),
    (M, "58,500", "\\boxed{58,000}", Some("58,000"), false),
    (M, "\\$32,\\!348", "\\boxed{\\$32,348}", Some("\\$32,348"), true),
    (M, "\\$18.90", "The total is \\boxed{18.90} dollars.", Some("18.90"), true),
    (M, "\\$18.90", "\\boxed{18.09}", Some("18.09"), false),
    // ---- radicals, pi, complex ----
    (M, "3\\sqrt{13}", "\\boxed{3\\sqrt{13}}", Some("3\\sqrt{13}"), true),
    (M, "3\\sqrt{13}", "\\boxed{\\sqrt{117}}", Some("\\sqrt{117}"), true),
    (M, "3\\sqrt{13}", "\\boxed{3\\sqrt{12}}", Some("3\\sqrt{12}"), false),
    (M, "\\sqrt{2}", "\\boxed{\\sqrt3}", Some("\\sqrt3"), false),
    (M, "11\\sqrt2", "\\boxed{11 \\sqrt{2}}", Some("11 \\sqrt{2}"), true),
    (M, "\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{1}{\\sqrt{3}}}", Some("\\frac{1}{\\sqrt{3}}"), true),
    (M, "\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{\\sqrt{3}}{2}}", Some("\\frac{\\sqrt{3}}{2}"), false),
    (M, "\\frac{3\\sqrt{3}}{4}", "\\boxed{\\frac34\\sqrt3}", Some("\\frac34\\sqrt3"), true),
    (M, "-\\sqrt{3}", "\\boxed{\\sqrt{3}}", Some("\\sqrt{3}"), false),
    (M, "1+2\\sqrt{3}", "\\boxed{2\\sqrt{3}+1}", Some("2\\sqrt{3}+1"), true),
    (M, "11 \\sqrt{5} + 11", "\\boxed{11(\\sqrt5+1)}", Some("11(\\sqrt5+1)"), true),
    (M, "\\pi", "\\boxed{\\pi}", Some("\\pi"), true),
    (M, "\\pi", "\\boxed{3.14}", Some("3.14"), false),
    (M, "288 \\pi", "\\boxed{288\\pi}", Some("288\\pi"), true),
    (M, "18+2\\pi", "\\boxed{2\\pi + 18}", Some("2\\pi + 18"), true),
    (M, "-\\frac{\\pi}{6}", "\\boxed{-\\pi/6}", Some("-\\pi/6"), true),
    (M, "-\\frac{\\pi}{6}", "\\boxed{\\frac{\\pi}{6}}", Some("\\frac{\\pi}{6}"), false),
    (M, "\\frac{20000}{\\pi}", "\\boxed{\\dfrac{20000}{\\pi}}", Some("\\dfrac{20000}{\\pi}"), true),
    (M, "6 - 5i", "\\boxed{-5i+6}", Some("-5i+6"), true),
    (M, "6 - 5i", "\\boxed{6+5i}", Some("6+5i"), false),
    (M, "1+274i", "\\boxed{1 + 274 i}", Some("1 + 274 i"), true),
    // ---- degrees, percent, units, text ----
    (M, "90^\\circ", "\\boxed{90}", Some("90"), true),
    (M, "90^\\circ", "\\boxed{90^{\\circ}}", Some("90^{\\circ}"), true),
    (M, "90^\\circ", "\\boxed{90\\text{ degrees}}", Some("90\\text{ degrees}"), true),
    (M, "90^\\circ", "\\boxed{9^\\circ}", Some("9^\\circ"), false),
    (M, "\\frac{270}7\\text{ degrees}", "\\boxed{\\frac{270}{7}}", Some("\\frac{270}{7}"), true),
    (M, "864 \\mbox{ inches}^2", "\\boxed{864}", Some("864"), true),
    (M, "15\\mbox{ cm}^2", "\\boxed{15 \\text{ cm}^2}", Some("15 \\text{ cm}^2"), true),
    (M, "5.4 \\text{ cents}", "\\boxed{5.4}", Some("5.4"), true),
    (M, "5.4 \\text{ cents}", "\\boxed{54}", Some("54"), false),
    (M, "25\\%", "\\boxed{25}", Some("25"), true),
    (M, "25\\%", "\\boxed{25\\%}", Some("25\\%"), true),
    (M, "\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", Some("\\text{Evelyn}"), true),
    (M, "\\text{Evelyn}", "\\boxed{Evelyn}", Some("Evelyn"), true),
    (M, "\\text{Evelyn}", "\\boxed{\\text{Navin}}", Some("\\text{Navin}"), false),
    (M, "\\text{(C)}", "\\boxed{C}", Some("C"), true),
    (M, "\\text{(C)}", "\\boxed{(C)}", Some("(C)"), true),
    (M, "\\text{(C)}", "\\boxed{\\textbf{(C)}}", Some("\\textbf{(C)}"), true),
    (M, "\\text{(C)}", "\\boxed{D}", Some("D"), false),
    (M, "\\text{east}", "\\boxed{\\text{East}}", Some("\\text{East}"), true),
    (M, "\\text{even}", "\\boxed{\\text{odd}}", Some("\\text{odd}"), false),
    (M, "\\text{ellipse}", "\\boxed{\\text{parabola}}", Some("\\text{parabola}"), false),
    // ---- prefixes, spacing, trailing period ----
    (M, "x=5", "\\boxed{5}", Some("5"), true),
    (M, "5", "\\boxed{x = 5.}", Some("x = 5."), true),
    (M, "5", "\\boxed{x = 6}", Some("x = 6"), false),
    (M, "3", "\\boxed{\\, 3 \\!}", Some("\\, 3 \\!"), true),
    (M, "y = 2x + 3", "\\boxed{y=2x+3}", Some("y=2x+3"), true),
    (M, "y = 2x + 3", "\\boxed{y=3x+2}", Some("y=3x+2"), false),
    (M, "y = -2x", "\\boxed{y=-2x}", Some("y=-2x"), true),
    (M, "5x - 7y + 11z + 4 = 0", "\\boxed{-5x+7y-11z-4=0}", Some("-5x+7y-11z-4=0"), true),
    (M, "5x - 7y + 11z + 4 = 0", "\\boxed{5x-7y+11z=0}", Some("5x-7y+11z=0"), false),
    // ---- tuples, intervals, sets, lists ----
    (M, "\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", Some("(3, \\pi/2)"), true),
    (M, "\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi)}", Some("(3, \\pi)"), false),
    (M, "\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(\\frac{\\pi}{2}, 3)}", Some("(\\frac{\\pi}{2}, 3)"), false),
    (M, "(6,31,-1)", "\\boxed{\\left(6, 31, -1\\right)}", Some("\\left(6, 31, -1\\right)"), true),
    (M, "(6,31,-1)", "\\boxed{(6,31,1)}", Some("(6,31,1)"), false),
    (M, "(6,31,-1)", "\\boxed{(6,31)}", Some("(6,31)"), false),
    (M, "(1,-16,-4,43)", "\\boxed{(1,-16,-4,43)}", Some("(1,-16,-4,43)"), true),
    (M, "(1,-16,-4,43)", "\\boxed{(1,-16,-4,42)}", Some("(1,-16,-4,42)"), false),
    (M, "(3,4]", "\\boxed{(3, 4]}", Some("(3, 4]"), true),
    (M, "(3,4]", "\\boxed{[3,4]}", Some("[3,4]"), false),
    (M, "(3,4]", "\\boxed{(3,4)}", Some("(3,4)"), false),
    (M, "(3,4]", "\\boxed{3 < x \\le 4}", Some("3 < x \\le 4"), false),
    (M, "(-\\infty, 0]", "\\boxed{(-\\infty,0]}", Some("(-\\infty,0]"), true),
    (M, "(-\\infty, 0]", "\\boxed{(\\infty,0]}", Some("(\\infty,0]"), false),
    (M, "(2,\\infty)", "\\boxed{(2, \\infty)}", Some("(2, \\infty)"), true),
    (M, "(-\\infty, 2) \\cup (3, \\infty)", "\\boxed{(-\\infty,2)\\cup(3,\\infty)}", Some("(-\\infty,2)\\cup(3,\\infty)"), true),
    (M, "(-\\infty, 2) \\cup (3, \\infty)", "\\boxed{(-\\infty,2]\\cup[3,\\infty)}", Some("(-\\infty,2]\\cup[3,\\infty)"), false),
    (M, "(-\\infty, 2) \\cup (3, \\infty)", "\\boxed{(-\\infty,2)}", Some("(-\\infty,2)"), false),
    (M, "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "\\boxed{(0.6, 8/3]}", Some("(0.6, 8/3]"), true),
    (M, "x \\in [-2,7]", "\\boxed{[-2, 7]}", Some("[-2, 7]"), true),
    (M, "\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]", "\\boxed{[\\pi^2/8, 5\\pi^2/4]}", Some("[\\pi^2/8, 5\\pi^2/4]"), true),
    (M, "1,-2", "\\boxed{-2, 1}", Some("-2, 1"), true),
    (M, "1,-2", "\\boxed{1, 2}", Some("1, 2"), false),
    (M, "1,-2", "\\boxed{1}", Some("1"), false),
    (M, "3, 5, 7", "\\boxed{7,5,3}", Some("7,5,3"), true),
    (M, "3, 5, 7", "\\boxed{3, 5}", Some("3, 5"), false),
    (M, "\\{1\\pm\\sqrt{5},-2\\}", "\\boxed{-2, 1+\\sqrt{5}, 1-\\sqrt{5}}", Some("-2, 1+\\sqrt{5}, 1-\\sqrt{5}"), true),
    (M, "\\{1\\pm\\sqrt{5},-2\\}", "\\boxed{-2, 1+\\sqrt{5}}", Some("-2, 1+\\sqrt{5}"), false),
    (M, "1 \\pm \\sqrt{19}", "\\boxed{1\\pm\\sqrt{19}}", Some("1\\pm\\sqrt{19}"), true),
    (M, "1 \\pm \\sqrt{19}", "\\boxed{1+\\sqrt{19}}", Some("1+\\sqrt{19}"), false),
    (M, "3 \\pm 2 \\sqrt{2}", "\\boxed{3+2\\sqrt2, 3-2\\sqrt2}", Some("3+2\\sqrt2, 3-2\\sqrt2"), true),
    // ---- matrices ----
    (M, "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", "\\boxed{\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}}", Some("\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}"), true),
    (M, "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", "\\boxed{\\begin{pmatrix} -2 \\\\ -14 \\\\ 7 \\end{pmatrix}}", Some("\\begin{pmatrix} -2 \\\\ -14 \\\\ 7 \\end{pmatrix}"), false),
    (M, "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}}", Some("\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}"), true),
    (M, "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}-1&0&0&-1\\end{pmatrix}}", Some("\\begin{pmatrix}-1&0&0&-1\\end{pmatrix}"), false),
    // ---- expressions with variables ----
    (M, "p - q", "\\boxed{-q+p}", Some("-q+p"), true),
    (M, "p - q", "\\boxed{q - p}", Some("q - p"), false),
    (M, "x^3+3x-6", "\\boxed{3x + x^3 - 6}", Some("3x + x^3 - 6"), true),
    (M, "x^3+3x-6", "\\boxed{x^3+3x+6}", Some("x^3+3x+6"), false),
    (M, "(a+5)(b+2)", "\\boxed{(b+2)(a+5)}", Some("(b+2)(a+5)"), true),
    (M, "(a+5)(b+2)", "\\boxed{ab+2a+5b+10}", Some("ab+2a+5b+10"), true),
    (M, "(a+5)(b+2)", "\\boxed{(a+2)(b+5)}", Some("(a+2)(b+5)"), false),
    (M, "2k+2", "\\boxed{2(k+1)}", Some("2(k+1)"), true),
    (M, "2k+2", "\\boxed{2k}", Some("2k"), false),
    (M, "\\cot x", "\\boxed{\\cot x}", Some("\\cot x"), true),
    (M, "\\cot x", "\\boxed{\\tan x}", Some("\\tan x"), false),
    (M, "52_8", "\\boxed{52_{8}}", Some("52_{8}"), true),
    (M, "52_8", "\\boxed{52_9}", Some("52_9"), false),
    // ---- fallbacks and extraction edge cases ----
    (M, "\\frac{3}{56}", "The answer is $\\frac{3}{56}$.", Some("\\frac{3}{56}"), true),
    (M, "\\frac{3}{56}", "Final answer: 3/56", Some("3/56"), true),
    (M, "7", "We get $x = 3$ and then $7$ is the total.", Some("7"), true),
    (M, "7", "We get $x = 7$ and then $3$ is the total.", Some("3"), false),
    (M, "7", "\\boxed{3} is wrong, so the answer is \\boxed{7}", Some("7"), true),
    (M, "\\frac{1}{4}", "So we get \\boxed{\\frac{1}{4}", None, false),
    (M, "4", "<think>\\boxed{4}</think>The result is \\boxed{5}.", Some("5"), false),
    (M, "4", "<think>it is 5</think>\\boxed{4}", Some("4"), true),
    (M, "2", "2", Some("2"), true),
    (M, "2", "The answer is 2 because x=2.", Some("2"), true),
    (M, "\\frac{1}{2}", "\\boxed{\\frac{1}{2}} and \\boxed{}", Some("\\frac{1}{2}"), true),
    (M, "\\frac{14}{3}", "Therefore, the final answer is: $\\boxed{\\frac{14}{3}}$. I hope it is correct.", Some("\\frac{14}{3}"), true),
    (M, "3", "**Final Answer**\n\\[\n\\boxed{3}\n\\]", Some("3"), true),
    (M, "\\sqrt{51}", "\\boxed{\\sqrt51}", Some("\\sqrt51"), false),
    (M, "0", "\\boxed{-0}", Some("-0"), true),
    (M, "\\frac{11+9a}{20}", "\\boxed{\\frac{9a+11}{20}}", Some("\\frac{9a+11}{20}"), true),
    (M, "\\frac{11+9a}{20}", "\\boxed{\\frac{9a+11}{2}}", Some("\\frac{9a+11}{2}"), false),
    (M, "4", "\\boxed{4 \\text{ students}}", Some("4 \\text{ students}"), true),
    (M, "\\$36", "\\boxed{36 \\text{ dollars}}", Some("36 \\text{ dollars}"), true),
    (G, "40", "The answer is $\\boxed{40}$ minutes.", Some("40"), true),
    (G, "18", "**Answer: $18**", Some("18"), true),
    (M, "2", "", None, false),
    // ---- LaTeX number spellings, working after the marker, named left sides (a helper's pass
    // over GSM8K and MATH-500) ----
    (G, "70000", "\\boxed{70{,}000}", Some("70000"), true),
    (G, "1430", "The total is $\\$1{,}430$.", Some("1430"), true),
    (G, "70000", "The answer is $70,\\!000$", Some("70000"), true),
    (G, "3000", "It costs 3\\,000 dollars.", Some("3000"), true),
    (G, "-3", "The answer is \u{2212}3.", Some("-3"), true),
    (G, "3", "The answer is \u{2212}3.", Some("-3"), false),
    (G, "15", "The answer is 20 - 5 = 15.", Some("15"), true),
    (G, "18", "The answer is 9 * 2 = 18 dollars.", Some("18"), true),
    (G, "18", "#### 9 * 2 = 18", Some("18"), true),
    (G, "18", "So the answer is: 9 x $2 = $18", Some("18"), true),
    (G, "20", "#### 20 (5 = 5 + 0)", Some("20"), true),
    (G, "9", "The answer is 20 - 5 = 15.", Some("15"), false),
    (M, "2220", "\\boxed{2{,}220}", Some("2{,}220"), true),
    (M, "2220", "\\boxed{2{,}221}", Some("2{,}221"), false),
    (M, "x^5 - x^2 - x - 1", "\\boxed{q(x) = x^5 - x^2 - x - 1}", Some("q(x) = x^5 - x^2 - x - 1"), true),
    (M, "(8,-2)", "\\boxed{(a,b) = (8,-2)}", Some("(a,b) = (8,-2)"), true),
    (M, "(8,-2)", "\\boxed{(a,b) = (-2,8)}", Some("(a,b) = (-2,8)"), false),
    (M, "\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(r,\\theta) = \\left(3, \\frac{\\pi}{2}\\right)}", Some("(r,\\theta) = \\left(3, \\frac{\\pi}{2}\\right)"), true),
    (M, "15", "\\boxed{20 - 5 = 15}", Some("20 - 5 = 15"), true),
    (M, "16", "\\boxed{20 - 5 = 15}", Some("20 - 5 = 15"), false),
    (M, "x^2+y^2=1", "\\boxed{x^2 + y^2 = 1}", Some("x^2 + y^2 = 1"), true),
    (M, "3, 5, 7", "\\boxed{3, 5, \\text{ and } 7}", Some("3, 5, \\text{ and } 7"), true),
    (M, "1,-2", "\\boxed{1 \\text{ and } -2}", Some("1 \\text{ and } -2"), true),
    (M, "3, 5, 7", "\\boxed{3, 5, \\text{ and } 8}", Some("3, 5, \\text{ and } 8"), false),
    (M, "\\sqrt{51}", "\\boxed{\u{221a}51}", Some("\u{221a}51"), true),
    (M, "\\sqrt{5}", "\\boxed{\u{221a}51}", Some("\u{221a}51"), false),
];

#[test]
fn grade_table() {
    let mut failures = Vec::new();
    let mut wrong_expected = 0;
    for (i, &(kind, reference, response, want_extracted, want_correct)) in CASES.iter().enumerate()
    {
        let got = grade(kind, reference, response);
        if !want_correct {
            wrong_expected += 1;
        }
        if got.extracted.as_deref() != want_extracted || got.correct != want_correct {
            failures.push(format!(
                "case {i} ({kind:?}) ref {reference:?} resp {response:?}: expected ({want_extracted:?}, {want_correct}), got ({:?}, {})",
                got.extracted, got.correct
            ));
        }
    }
    assert!(CASES.len() >= 120, "{} cases", CASES.len());
    assert!(
        wrong_expected >= 40,
        "{wrong_expected} must-not-match cases"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

/// The shared data folder, or `None` (with a message) when this machine does not have it.
fn data_dir() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
        PathBuf::from("/work/shared/data"),
    ];
    let found = candidates
        .into_iter()
        .find(|d| d.join("math500_test.jsonl").exists() && d.join("gsm8k_test.jsonl").exists());
    if found.is_none() {
        println!("skipping: no gsm8k_test.jsonl / math500_test.jsonl in ../shared/data or /work/shared/data");
    }
    found
}

#[test]
fn math500_references_grade_themselves() {
    let Some(dir) = data_dir() else { return };
    let rows = load_dataset(
        &dir.join("math500_test.jsonl"),
        DatasetKind::Math500,
        None,
        None,
        0,
        None,
    )
    .unwrap();
    assert_eq!(rows.len(), 500);
    let mut boxed_fail = Vec::new();
    let mut phrase_fail = Vec::new();
    for p in &rows {
        let boxed = grade(
            GradeKind::Math,
            &p.answer,
            &format!("So the result is $\\boxed{{{}}}$.", p.answer),
        );
        if !boxed.correct {
            boxed_fail.push(format!(
                "#{} {:?} -> {:?}",
                p.index, p.answer, boxed.extracted
            ));
        }
        // Another spelling of the same answer: `\dfrac`, spaces after commas, inline math.
        let respelled = p.answer.replace("\\frac", "\\dfrac").replace(',', ", ");
        let phrase = grade(
            GradeKind::Math,
            &p.answer,
            &format!("Working...\nThe answer is ${respelled}$."),
        );
        if !phrase.correct {
            phrase_fail.push(format!(
                "#{} {:?} -> {:?}",
                p.index, p.answer, phrase.extracted
            ));
        }
    }
    println!(
        "MATH-500 self-grading: boxed {} / 500 fail, phrase {} / 500 fail",
        boxed_fail.len(),
        phrase_fail.len()
    );
    assert!(
        boxed_fail.is_empty(),
        "boxed self-grade failures ({}):\n{}",
        boxed_fail.len(),
        boxed_fail[..boxed_fail.len().min(10)].join("\n")
    );
    assert!(
        phrase_fail.is_empty(),
        "phrase self-grade failures ({}):\n{}",
        phrase_fail.len(),
        phrase_fail[..phrase_fail.len().min(10)].join("\n")
    );
}

#[test]
fn math500_answers_do_not_match_other_answers() {
    let Some(dir) = data_dir() else { return };
    let rows = load_dataset(
        &dir.join("math500_test.jsonl"),
        DatasetKind::Math500,
        None,
        None,
        0,
        None,
    )
    .unwrap();
    let norm: Vec<String> = rows.iter().map(|p| normalize(&p.answer)).collect();
    let mut false_matches = Vec::new();
    let mut genuine = 0;
    for i in 0..rows.len() {
        for j in 0..rows.len() {
            if i == j || !equivalent(&rows[i].answer, &rows[j].answer) {
                continue;
            }
            // A match is genuine when the normalised strings are equal, or both are constants
            // (no variables) of the same value (`\frac14` and `\frac{1}{4}`, `10,\!080` and
            // `10080`), or both are the same list of solutions in another order (`1,-2`, `-2,1`).
            let constant = |s: &str| {
                let s = if s.bytes().all(|b| b.is_ascii_digit() || b == b',') {
                    s.replace(',', "")
                } else {
                    s.to_string()
                };
                (!has_variables(&s))
                    .then(|| evaluate(&s))
                    .flatten()
                    .map(|v| v[0])
            };
            let same_constant = matches!((constant(&norm[i]), constant(&norm[j])),
                (Some(a), Some(b)) if a.im == b.im && (a.re - b.re).abs() <= 1e-9 * a.re.abs());
            let sorted = |s: &str| {
                let mut v: Vec<String> = s.split(',').map(str::to_string).collect();
                v.sort();
                v
            };
            let same_list = sorted(&norm[i]) == sorted(&norm[j]);
            if norm[i] == norm[j] || same_constant || same_list {
                genuine += 1;
                continue;
            }
            false_matches.push(format!(
                "#{i} {:?} ~ #{j} {:?}",
                rows[i].answer, rows[j].answer
            ));
        }
    }
    println!(
        "MATH-500 cross pairs: {genuine} genuine matches (equal answers), {} false",
        false_matches.len()
    );
    assert!(
        false_matches.is_empty(),
        "{}",
        false_matches[..false_matches.len().min(10)].join("\n")
    );
}

#[test]
fn gsm8k_references_grade_themselves() {
    let Some(dir) = data_dir() else { return };
    let rows = load_dataset(
        &dir.join("gsm8k_test.jsonl"),
        DatasetKind::Gsm8k,
        None,
        None,
        0,
        None,
    )
    .unwrap();
    assert_eq!(rows.len(), 1319);
    let mut fails = Vec::new();
    for p in &rows {
        for response in [
            format!("Step one.\n#### {}", p.answer),
            format!("We add 3 and 4.\nThe answer is {}.", p.answer),
        ] {
            let g = grade(GradeKind::Gsm8k, &p.answer, &response);
            if !g.correct {
                fails.push(format!("#{} {:?} -> {:?}", p.index, p.answer, g.extracted));
            }
        }
        // Off by one must not grade correct.
        let wrong = format!("#### {}", p.answer.parse::<f64>().unwrap() + 1.0);
        if grade(GradeKind::Gsm8k, &p.answer, &wrong).correct {
            fails.push(format!("#{} {:?} matched {wrong:?}", p.index, p.answer));
        }
    }
    println!(
        "GSM8K self-grading: {} / {} fail",
        fails.len(),
        3 * rows.len()
    );
    assert!(
        fails.is_empty(),
        "{}",
        fails[..fails.len().min(10)].join("\n")
    );
}

/// Random text built from LaTeX fragments, digits and multi-byte characters never panics the
/// grader (model output is arbitrary), and a long nested box is refused rather than recursed.
#[test]
fn grader_survives_noise() {
    const PIECES: &[&str] = &[
        "\\boxed{",
        "\\fbox",
        "}",
        "{",
        "\\frac",
        "\\sqrt",
        "[",
        "]",
        "(",
        ")",
        "1",
        "23",
        ",",
        ".",
        "-",
        "^",
        "_",
        "\\pi",
        "\\text{",
        " cm",
        "$",
        "\\$",
        "\\left(",
        "\\right]",
        "\\pm",
        "\\cup",
        "\\{",
        "\\}",
        "x",
        "i",
        "=",
        "é",
        "·",
        "π",
        "√",
        "°",
        " ",
        "\n",
        "####",
        "The answer is ",
        "</think>",
        "\\begin{pmatrix}",
        "\\\\",
        "&",
        "\\end{pmatrix}",
        "!",
        "\\infty",
        "%",
        "0.5",
        "\\,",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..4000 {
        let mut text = String::new();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        for _ in 0..(state % 24) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            text.push_str(PIECES[(state % PIECES.len() as u64) as usize]);
        }
        for kind in [GradeKind::Gsm8k, GradeKind::Math] {
            grade(kind, &text, &text);
            grade(kind, "\\frac{1}{2}", &text);
        }
    }
    let deep = format!("\\boxed{{{}1{}}}", "(".repeat(5000), ")".repeat(5000));
    assert!(!grade(GradeKind::Math, "1", &deep).correct);
}
