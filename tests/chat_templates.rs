//! Chat-template rendering against the strings HF transformers produces for the checkpoints we
//! use. The templates in tests/fixtures/templates/ are hand-written in the Jinja dialect of
//! those checkpoints (see the README there); the expected strings below were also checked with
//! Python's jinja2 under HF's settings (trim_blocks, lstrip_blocks, loopcontrols).

use std::path::{Path, PathBuf};

use thinksteer::chat::{plain_base_prompt, ChatTemplate, Message};
use thinksteer::Error;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/templates")
        .join(name)
}

fn load(name: &str) -> ChatTemplate {
    ChatTemplate::from_dir(&fixture(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .unwrap_or_else(|| panic!("{name}: no chat template found"))
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("thinksteer-chat-{name}-{}", std::process::id()));
    // Empty: a directory left by an earlier run with the same process id must not count.
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// system, user, assistant (with a reasoning block), user: exercises system handling,
/// past-turn formatting and reasoning stripping.
fn multi_turn() -> Vec<Message> {
    vec![
        Message::system("Be brief."),
        Message::user("Q"),
        Message::assistant("<think>\nr\n</think>\n\nA"),
        Message::user("Q2"),
    ]
}

const QWEN_SYSTEM: &str = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n";

#[test]
fn qwen25_single_turn_uses_default_system_prompt_and_no_tools() {
    // Loaded from tokenizer_config.json (template stored as an escaped JSON string).
    let t = load("qwen2.5-instruct");
    assert_eq!(t.bos_token(), None, "bos_token is null in Qwen's config");
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    let s = t.render(&[Message::user("Q")], true).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(
        !s.contains("<tools>"),
        "tools section must be absent: {s:?}"
    );
    let no_prompt = t.render(&[Message::user("Q")], false).unwrap();
    assert_eq!(
        no_prompt,
        format!("{QWEN_SYSTEM}<|im_start|>user\nQ<|im_end|>\n")
    );
}

#[test]
fn qwen25_multi_turn_uses_given_system_prompt_once() {
    let t = load("qwen2.5-instruct");
    assert_eq!(
        t.render(&multi_turn(), true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nA<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    );
    // Without a system turn the default one comes back, and whitespace is kept verbatim.
    let msgs = [
        Message::user(" Q "),
        Message::assistant(" A "),
        Message::user("Q2"),
    ];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        format!("{QWEN_SYSTEM}<|im_start|>user\n Q <|im_end|>\n<|im_start|>assistant\n A <|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    );
}

#[test]
fn r1_distill_single_turn_opens_think_block() {
    // bos/eos stored as AddedToken objects in tokenizer_config.json.
    let t = load("deepseek-r1-distill-qwen");
    assert_eq!(t.bos_token(), Some("<｜begin▁of▁sentence｜>"));
    assert_eq!(t.eos_token(), Some("<｜end▁of▁sentence｜>"));
    assert_eq!(
        t.render(&[Message::user("Q")], true).unwrap(),
        "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>\n"
    );
    assert_eq!(
        t.render(&[Message::user("Q")], false).unwrap(),
        "<｜begin▁of▁sentence｜><｜User｜>Q"
    );
}

#[test]
fn r1_distill_multi_turn_strips_past_reasoning() {
    let t = load("deepseek-r1-distill-qwen");
    // namespace() carries the system prompt out of the first loop; split('</think>')[-1]
    // keeps only the answer of the past assistant turn.
    assert_eq!(
        t.render(&multi_turn(), true).unwrap(),
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Q<｜Assistant｜>\n\nA<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜><think>\n"
    );
}

const LLAMA_HEADER: &str = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";

#[test]
fn llama31_single_turn_has_cutoff_header_with_default_date() {
    // Loaded from chat_template.jinja, which wins over the decoy key in tokenizer_config.json;
    // bos/eos still come from tokenizer_config.json.
    let t = load("llama-3.1-instruct");
    assert_eq!(t.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(
        t.render(&[Message::user("Q")], true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn llama31_multi_turn_folds_system_and_trims_content() {
    let t = load("llama-3.1-instruct");
    assert_eq!(
        t.render(&multi_turn(), true).unwrap(),
        format!("{LLAMA_HEADER}Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\nr\n</think>\n\nA<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    );
    let msgs = [
        Message::user(" Q "),
        Message::assistant(" A "),
        Message::user("Q2"),
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        format!("{LLAMA_HEADER}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>")
    );
}

/// `date -u +FORMAT`, or None where the command is unavailable.
fn shell_date(fmt: &str) -> Option<String> {
    let out = std::process::Command::new("date")
        .arg("-u")
        .arg(format!("+{fmt}"))
        .env("LC_ALL", "C")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn llama32_named_default_template_uses_strftime_now_and_loop_controls() {
    // chat_template is a list of {name, template}: "default" must be picked.
    let t = load("llama-3.2-named-list");
    let before = shell_date("%d %b %Y");
    let s = t.render(&multi_turn(), true).unwrap();
    let after = shell_date("%d %b %Y");
    let date = s
        .split("Today Date: ")
        .nth(1)
        .and_then(|r| r.split('\n').next())
        .unwrap_or_else(|| panic!("no date line in {s:?}"));
    // "DD Mon YYYY" with a real month abbreviation and a plausible year.
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date:?}");
    assert!(parts[0].len() == 2 && parts[0].parse::<u32>().is_ok_and(|d| (1..=31).contains(&d)));
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    assert!(months.contains(&parts[1]), "{date:?}");
    assert!(parts[2].parse::<u32>().is_ok_and(|y| y >= 2025), "{date:?}");
    match (before, after) {
        (Some(b), Some(a)) => assert!(date == b || date == a, "{date:?} vs date(1): {b:?}/{a:?}"),
        _ => eprintln!("`date` unavailable: checked the date's format only"),
    }
    // `continue` skipped the system turn, the rest rendered in order.
    assert!(s.ends_with("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\nr\n</think>\n\nA<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), "{s:?}");
    assert!(!s.contains("Be brief."));
    // `break` stops after eight messages.
    let many: Vec<Message> = (0..12).map(|i| Message::user(&format!("m{i}"))).collect();
    let s = t.render(&many, false).unwrap();
    assert!(s.contains("m7<|eot_id|>") && !s.contains("m8"), "{s:?}");
}

#[test]
fn raise_exception_is_an_input_error_with_the_message() {
    let t = load("strict-alternation");
    assert_eq!(
        t.render(&[Message::user(" Q "), Message::assistant("A ")], false)
            .unwrap(),
        "<s>[INST] Q [/INST] A</s>"
    );
    let bad = [Message::user("Q"), Message::user("Q again")];
    match t.render(&bad, true) {
        Err(Error::Input(m)) => assert!(
            m.contains("Conversation roles must alternate user/assistant/user/assistant/..."),
            "{m}"
        ),
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

#[test]
fn python_string_methods_and_tojson_render() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{{ m.content.strip().split(',') | tojson }}|{{ m.content.startswith(' a') }}|{{ m.content.upper() }}|{{ m | tojson }}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        t.render(&[Message::user(" a,b<c ")], false).unwrap(),
        "[\"a\", \"b<c\"]|True| A,B<C |{\"role\": \"user\", \"content\": \" a,b<c \"}"
    );
}

#[test]
fn missing_and_malformed_templates() {
    // No template anywhere: None, not an error.
    let d = temp_dir("none");
    assert!(ChatTemplate::from_dir(&d).unwrap().is_none());
    std::fs::write(d.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).unwrap();
    assert!(ChatTemplate::from_dir(&d).unwrap().is_none());

    let expect_input = |dir: &Path, needle: &str| match ChatTemplate::from_dir(dir) {
        Err(Error::Input(m)) => assert!(m.contains(needle), "{needle:?} not in {m:?}"),
        other => panic!("expected Error::Input naming {needle}, got {other:?}"),
    };
    std::fs::write(d.join("tokenizer_config.json"), "{\"chat_template\": ").unwrap();
    expect_input(&d, "tokenizer_config.json");
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#,
    )
    .unwrap();
    expect_input(&d, "\"default\"");
    std::fs::write(d.join("tokenizer_config.json"), r#"{"eos_token": 7}"#).unwrap();
    std::fs::write(d.join("chat_template.jinja"), "{{ x }}").unwrap();
    expect_input(&d, "eos_token");
    std::fs::write(d.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(d.join("chat_template.jinja"), "{% if %}").unwrap();
    expect_input(&d, "chat_template.jinja");
}

#[test]
fn base_prompt_matches_spec() {
    assert_eq!(
        plain_base_prompt("Natalia sold 48 clips."),
        "Task: Answer the question below. Explain your reasoning step by step.\n\n\n\nQuestion:\nNatalia sold 48 clips.\n\nStep by step answer:\n"
    );
}
