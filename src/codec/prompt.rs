//! Requests to language models, and their streamed answers.
//!
//! A request is plain UTF-8 text (one user message; one trailing newline,
//! as `echo` adds, is dropped) or a JSON object in the shape people
//! already use: `{"messages": [{"role": ..., "content": ...}]}` or
//! `{"prompt": "..."}`, with `max_tokens`, `temperature`, `top_p`, `seed`
//! and `stop`. The answer to text is the generated text as it comes (and a
//! final newline); to JSON, one JSON line per chunk,
//! `{"text": "...", "tokens": [ids]}`, then a last line with
//! `finish_reason` and token counts.

use serde_json::Value;

use crate::backend::Finish;
use crate::error::{Error, Result};

/// The most tokens a request may ask for (a model's context bounds it
/// further).
pub const MAX_TOKENS: u32 = 65_536;

#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub input: PromptInput,
    /// `None`: the model's `config.json` `max_tokens`.
    pub max_tokens: Option<u32>,
    /// 0: greedy (the default; reproducible).
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation ends before any of these texts (not included).
    pub stop: Vec<String>,
    /// Answer with JSON lines (the request was JSON).
    pub json: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    /// Through the model's chat template.
    Chat(Vec<Message>),
    /// As it is.
    Raw(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

const KEYS: &[&str] = &["messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop"];
const ROLES: &[&str] = &["system", "user", "assistant"];

fn bad(msg: impl Into<String>) -> Error {
    Error::BadInput(crate::error::one_line(&msg.into()))
}

/// Decodes a request to a language model.
pub fn decode(bytes: &[u8]) -> Result<Prompt> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        bad(format!("a prompt must be UTF-8: invalid byte at offset {} (or send JSON)", e.valid_up_to()))
    })?;
    let plain = |text: &str| {
        let text = text.strip_suffix('\n').unwrap_or(text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            return Err(bad("empty request"));
        }
        let message = Message { role: "user".into(), content: text.into() };
        Ok(Prompt {
            input: PromptInput::Chat(vec![message]),
            max_tokens: None,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
            json: false,
        })
    };
    if !text.trim_start().starts_with('{') {
        return plain(text);
    }
    // A sentence that begins with a brace is a sentence.
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
        return plain(text);
    };
    if let Some(unknown) = map.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(bad(format!("unknown key {unknown:?} (known: {})", KEYS.join(", "))));
    }
    let input = match (map.get("messages"), map.get("prompt")) {
        (Some(_), Some(_)) => return Err(bad("give messages or prompt, not both")),
        (None, None) => return Err(bad("a JSON request needs messages or prompt")),
        (None, Some(Value::String(p))) if !p.is_empty() => PromptInput::Raw(p.clone()),
        (None, Some(_)) => return Err(bad("prompt must be a non-empty string")),
        (Some(Value::Array(list)), None) if !list.is_empty() => {
            PromptInput::Chat(list.iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<_>>()?)
        }
        (Some(_), None) => return Err(bad("messages must be a non-empty array")),
    };
    let number = |key: &str, default: f64, range: std::ops::RangeInclusive<f64>| match map.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| range.contains(x))
            .ok_or_else(|| bad(format!("{key} must be a number from {} to {}", range.start(), range.end()))),
    };
    let integer = |key: &str, range: std::ops::RangeInclusive<u64>| match map.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|x| range.contains(x))
            .map(Some)
            .ok_or_else(|| bad(format!("{key} must be an integer from {} to {}", range.start(), range.end()))),
    };
    let stop = match map.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(list)) if list.len() <= 16 => list
            .iter()
            .map(|s| s.as_str().filter(|s| !s.is_empty()).map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("stop must be a non-empty string or a list of them"))?,
        Some(_) => return Err(bad("stop must be a non-empty string or a list of at most 16")),
    };
    Ok(Prompt {
        input,
        max_tokens: integer("max_tokens", 1..=MAX_TOKENS as u64)?.map(|n| n as u32),
        temperature: number("temperature", 0.0, 0.0..=2.0)?,
        top_p: number("top_p", 1.0, f64::MIN_POSITIVE..=1.0)?,
        seed: integer("seed", 0..=u64::MAX)?.unwrap_or(0),
        stop,
        json: true,
    })
}

fn message(i: usize, m: &Value) -> Result<Message> {
    let field = |key: &str| m.get(key).and_then(Value::as_str);
    match (field("role"), field("content")) {
        (Some(role), Some(content)) if ROLES.contains(&role) => {
            Ok(Message { role: role.into(), content: content.into() })
        }
        (Some(role), Some(_)) => Err(bad(format!("messages[{i}]: role {role:?} is not one of {}", ROLES.join(", ")))),
        _ => Err(bad(format!("messages[{i}] needs a role and a content string"))),
    }
}

/// Turns generated tokens into the answer's bytes: holds back text that
/// may be the start of a stop sequence, ends at one, and writes text or
/// JSON lines.
pub struct Answer {
    json: bool,
    stop: Vec<String>,
    /// Text generated and not yet written (a stop sequence may begin in it).
    held: String,
    /// Token ids not yet written.
    ids: Vec<u32>,
    /// Whether the text written so far ends with a newline (an empty
    /// answer is a newline).
    ends_with_newline: bool,
}

impl Answer {
    pub fn new(prompt: &Prompt) -> Answer {
        Answer {
            json: prompt.json,
            stop: prompt.stop.clone(),
            held: String::new(),
            ids: vec![],
            ends_with_newline: false,
        }
    }

    /// The bytes a token adds to the answer, and whether a stop sequence
    /// ended it.
    pub fn push(&mut self, id: u32, text: &str) -> (Vec<u8>, bool) {
        self.ids.push(id);
        self.held.push_str(text);
        if let Some(at) = self.stop.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.held.truncate(at);
            return (self.take(self.held.len()), true);
        }
        // Keep the longest tail that a stop sequence begins with.
        let keep = self
            .stop
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        (self.take(self.held.len() - keep), false)
    }

    /// The answer's last bytes: what is held, and for JSON the closing line.
    pub fn finish(&mut self, reason: Finish, prompt_tokens: usize, completion_tokens: usize) -> Vec<u8> {
        let mut out = self.take(self.held.len());
        if self.json {
            let last = serde_json::json!({
                "finish_reason": reason.name(),
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
            });
            out.extend_from_slice(format!("{last}\n").as_bytes());
        } else if !self.ends_with_newline {
            out.push(b'\n');
        }
        out
    }

    /// Writes the first `n` bytes held.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let text: String = self.held.drain(..n).collect();
        if self.json {
            if text.is_empty() && self.ids.is_empty() {
                return vec![];
            }
            let line = serde_json::json!({ "text": text, "tokens": std::mem::take(&mut self.ids) });
            return format!("{line}\n").into_bytes();
        }
        if let Some(last) = text.as_bytes().last() {
            self.ends_with_newline = *last == b'\n';
        }
        text.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &str) -> String {
        let e = decode(bytes.as_bytes()).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        e.to_string()
    }

    #[test]
    fn text_is_one_user_message() {
        let p = decode(b"Write a haiku.\n").unwrap();
        assert_eq!(p.input, PromptInput::Chat(vec![Message { role: "user".into(), content: "Write a haiku.".into() }]));
        assert_eq!((p.temperature, p.max_tokens, p.json), (0.0, None, false));
        // Braces that are not JSON are text too.
        assert!(matches!(decode(b"{not json} here").unwrap().input, PromptInput::Chat(_)));
    }

    #[test]
    fn json_gives_control() {
        let p = decode(br#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}],"max_tokens":5,"temperature":0.7,"top_p":0.9,"seed":3,"stop":"\n\n"}"#).unwrap();
        assert_eq!((p.max_tokens, p.temperature, p.top_p, p.seed, p.json), (Some(5), 0.7, 0.9, 3, true));
        assert_eq!(p.stop, vec!["\n\n".to_string()]);
        assert_eq!(decode(br#"{"prompt":"Once"}"#).unwrap().input, PromptInput::Raw("Once".into()));
    }

    #[test]
    fn invalid_requests_say_why() {
        assert!(err("").contains("empty request"));
        assert!(err("\n").contains("empty request"));
        assert!(err(r#"{"prompt":"a","messages":[]}"#).contains("not both"));
        assert!(err(r#"{"max_tokens":3}"#).contains("needs messages or prompt"));
        assert!(err(r#"{"prompt":"a","max_tokens":0}"#).contains("max_tokens must be an integer from 1 to 65536"));
        assert!(err(r#"{"prompt":"a","max_tokens":70000}"#).contains("max_tokens"));
        assert!(err(r#"{"prompt":"a","temperature":-1}"#).contains("temperature"));
        assert!(err(r#"{"prompt":"a","top_p":0}"#).contains("top_p"));
        assert!(err(r#"{"prompt":"a","stream":true}"#).contains("unknown key \"stream\""));
        assert!(err(r#"{"messages":[{"role":"robot","content":"x"}]}"#).contains("messages[0]: role \"robot\""));
        assert!(err(r#"{"messages":[{"role":"user"}]}"#).contains("needs a role and a content"));
        assert!(decode(&[0xff, 0xfe]).unwrap_err().to_string().contains("UTF-8"));
    }

    fn answer(stop: &[&str], json: bool) -> Answer {
        let mut p = decode(b"x").unwrap();
        p.stop = stop.iter().map(|s| s.to_string()).collect();
        p.json = json;
        Answer::new(&p)
    }

    #[test]
    fn text_answers_stream_and_end_with_a_newline() {
        let mut a = answer(&[], false);
        assert_eq!(a.push(1, "Hello"), (b"Hello".to_vec(), false));
        assert_eq!(a.push(2, " world"), (b" world".to_vec(), false));
        assert_eq!(a.finish(Finish::Stop, 3, 2), b"\n");
    }

    #[test]
    fn a_stop_sequence_is_held_back_then_ends_the_answer() {
        let mut a = answer(&["\n\n", "END"], false);
        assert_eq!(a.push(1, "one\n"), (b"one".to_vec(), false));
        // "\n" might begin "\n\n": held; "E" might begin "END": held.
        assert_eq!(a.push(2, "x E"), (b"\nx ".to_vec(), false));
        assert_eq!(a.push(3, "ND more"), (b"".to_vec(), true));
        let mut b = answer(&["\n\n"], false);
        assert_eq!(b.push(1, "a\n"), (b"a".to_vec(), false));
        assert_eq!(b.push(2, "b"), (b"\nb".to_vec(), false));
        assert_eq!(b.finish(Finish::Length, 1, 2), b"\n");
    }

    #[test]
    fn json_answers_are_lines_with_token_ids_then_the_counts() {
        let mut a = answer(&[], true);
        assert_eq!(a.push(7, "Hi"), (b"{\"text\":\"Hi\",\"tokens\":[7]}\n".to_vec(), false));
        // A token that completes no character yet: a line with its id.
        assert_eq!(a.push(8, ""), (b"{\"text\":\"\",\"tokens\":[8]}\n".to_vec(), false));
        let last = a.finish(Finish::Length, 4, 2);
        assert_eq!(last, b"{\"completion_tokens\":2,\"finish_reason\":\"length\",\"prompt_tokens\":4}\n");
    }
}
