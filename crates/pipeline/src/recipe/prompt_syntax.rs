//! Prompt syntax: attention weights, `BREAK` and prompts longer than one CLIP context, read
//! as AUTOMATIC1111's web UI or ComfyUI read them (the recipe's `prompt_syntax`).
//!
//! * [`PromptSyntax::A1111`] (the default) transcribes A1111's `prompt_parser.parse_prompt_attention`
//!   (`(text)` ×1.1, `[text]` ÷1.1, `(text:w)`, the escapes `\(` `\)` `\[` `\]` `\\`, `BREAK`,
//!   unbalanced brackets closed at the end or kept as text) and `sd_hijack_clip`'s
//!   `tokenize_line` (chunks of 75 tokens, the comma backtrack of 20, an embedding never split,
//!   each chunk padded and wrapped in BOS / EOS). A1111's prompt editing `[a:b:when]` and
//!   alternation `[a|b]` are not read: like `parse_prompt_attention` alone, they are weighted
//!   ÷1.1 as text (with a warning).
//! * [`PromptSyntax::Comfy`] transcribes ComfyUI's `comfy/sd1_clip.py`: `token_weights` (only
//!   parentheses; `(text:w)` sets the weight, it does not multiply; `\(` `\)` escapes) and
//!   `tokenize_with_weights` (each weighted segment one group, moved whole to the next chunk
//!   unless it has 8 tokens or more).
//! * [`PromptSyntax::Plain`]: no syntax; one chunk, truncated to 75 tokens, as diffusers.
//!
//! How the chunks are encoded and weighted is in `run/text.rs`.

use std::sync::OnceLock;

use ipcompose_models::tokenizer::ClipTokenizer;
use regex::Regex;

/// A1111's `opts.comma_padding_backtrack` default: a chunk that fills up within this many
/// tokens after a comma is cut after the comma.
pub const COMMA_PADDING_BACKTRACK: usize = 20;

/// ComfyUI's `max_word_length`: a group of at least this many tokens may be split across
/// chunks; a shorter one moves whole to the next chunk.
const COMFY_MAX_WORD_LENGTH: usize = 8;

/// How the prompts of a generation are read (`prompt_syntax:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// AUTOMATIC1111: attention weights, `BREAK`, chunks of 75 tokens with the mean restored
    /// after weighting.
    #[default]
    A1111,
    /// ComfyUI: parenthesis weights interpolating from the empty prompt's encoding, chunks.
    Comfy,
    /// The text as it is, truncated to one context, as diffusers.
    Plain,
}

impl PromptSyntax {
    /// The values a recipe may give, for error messages.
    pub const NAMES: &'static str = "a1111, comfy, plain";

    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "a1111" => Some(Self::A1111),
            "comfy" => Some(Self::Comfy),
            "plain" => Some(Self::Plain),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::A1111 => "a1111",
            Self::Comfy => "comfy",
            Self::Plain => "plain",
        }
    }
}

/// A run of prompt text with its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedText {
    pub text: String,
    pub weight: f64,
}

impl WeightedText {
    fn new(text: &str, weight: f64) -> Self {
        Self {
            text: text.to_string(),
            weight,
        }
    }

    /// A1111's `BREAK` marker: the text `BREAK` with weight −1 exactly. A `BREAK` inside
    /// brackets has its −1 multiplied and is then read as the word, as in A1111.
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// Something in a prompt that is read differently from what it may mean (an unbalanced
/// bracket), with its 1-based column (in characters).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxWarning {
    pub column: usize,
    pub message: String,
}

/// A prompt that cannot be read (A1111 stops on it too), with its 1-based column (0 where
/// the place is not known).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.column > 0 {
            write!(f, "column {}: ", self.column)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for SyntaxError {}

/// A prompt split into weighted texts.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedPrompt {
    pub pieces: Vec<WeightedText>,
    pub warnings: Vec<SyntaxWarning>,
}

/// Reads `text` in `syntax`.
pub fn parse(text: &str, syntax: PromptSyntax) -> Result<ParsedPrompt, SyntaxError> {
    match syntax {
        PromptSyntax::A1111 => parse_a1111(text),
        PromptSyntax::Comfy => parse_comfy(text),
        PromptSyntax::Plain => Ok(ParsedPrompt {
            pieces: vec![WeightedText::new(text, 1.0)],
            warnings: Vec::new(),
        }),
    }
}

/// 1-based character column of byte offset `at`.
fn column(text: &str, at: usize) -> usize {
    text[..at].chars().count() + 1
}

fn attention_pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    // A1111's `re_attention`, alternative by alternative; leftmost-first like Python's `re`.
    PATTERN.get_or_init(|| {
        Regex::new(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:")
            .expect("constant pattern")
    })
}

fn break_pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    // A1111's `re_break`.
    PATTERN.get_or_init(|| Regex::new(r"(?s)\s*\bBREAK\b\s*").expect("constant pattern"))
}

/// A1111's `parse_prompt_attention`, with warnings where brackets are unbalanced.
///
/// `a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).` gives `a ` 1.0, `house` 1.573,
/// ` ` 1.1, `on` 1.0, ` a ` 1.1, `hill` 0.55, `, sun, ` 1.1, `sky` 1.4641, `.` 1.1.
pub fn parse_a1111(text: &str) -> Result<ParsedPrompt, SyntaxError> {
    const ROUND: f64 = 1.1;
    const SQUARE: f64 = 1.0 / 1.1;
    let mut res: Vec<WeightedText> = Vec::new();
    let mut warnings = Vec::new();
    // (index in `res` where the bracket opened, its column)
    let mut round: Vec<(usize, usize)> = Vec::new();
    // (index, column, whether a prompt-editing warning was given for it)
    let mut square: Vec<(usize, usize, bool)> = Vec::new();
    let multiply = |res: &mut Vec<WeightedText>, start: usize, by: f64| {
        for piece in &mut res[start..] {
            piece.weight *= by;
        }
    };
    for captures in attention_pattern().captures_iter(text) {
        let Some(whole) = captures.get(0) else {
            continue;
        };
        let token = whole.as_str();
        let at = column(text, whole.start());
        let weight = captures.get(1);
        if let Some(escaped) = token.strip_prefix('\\') {
            if escaped.is_empty() {
                warnings.push(SyntaxWarning {
                    column: at,
                    message: "a `\\` that escapes nothing is dropped, as A1111 does (write `\\\\` for a backslash)".to_string(),
                });
            }
            res.push(WeightedText::new(escaped, 1.0));
        } else if token == "(" {
            round.push((res.len(), at));
        } else if token == "[" {
            square.push((res.len(), at, false));
        } else if let (Some(weight), Some(&(start, _))) = (weight, round.last()) {
            let value = python_float(weight.as_str())
                .filter(|v| v.is_finite())
                .ok_or_else(|| SyntaxError {
                    column: column(text, weight.start()),
                    message: format!(
                        "the weight `{}` is not a number (A1111 stops on it too)",
                        weight.as_str()
                    ),
                })?;
            round.pop();
            multiply(&mut res, start, value);
        } else if token == ")" && !round.is_empty() {
            if let Some((start, _)) = round.pop() {
                multiply(&mut res, start, ROUND);
            }
        } else if token == "]" && !square.is_empty() {
            if let Some((start, _, _)) = square.pop() {
                multiply(&mut res, start, SQUARE);
            }
        } else {
            if token == ")" || token == "]" || weight.is_some() {
                let closing = if token == "]" { "]" } else { ")" };
                let at = if weight.is_some() {
                    column(text, whole.end() - 1)
                } else {
                    at
                };
                warnings.push(SyntaxWarning {
                    column: at,
                    message: format!(
                        "`{closing}` closes no bracket: it is kept as text, as A1111 does"
                    ),
                });
            }
            if let Some(open) = square.last_mut() {
                if !open.2 && (token == ":" || token.contains('|')) {
                    open.2 = true;
                    warnings.push(SyntaxWarning {
                        column: open.1,
                        message: "`[a:b:when]` prompt editing and `[a|b]` alternation are not scheduled: the text in `[`…`]` is weighted ÷1.1 as written, as A1111's attention parser reads it".to_string(),
                    });
                }
            }
            for (i, part) in break_pattern().split(token).enumerate() {
                if i > 0 {
                    res.push(WeightedText::new("BREAK", -1.0));
                }
                res.push(WeightedText::new(part, 1.0));
            }
        }
    }
    for &(start, at) in &round {
        multiply(&mut res, start, ROUND);
        warnings.push(SyntaxWarning {
            column: at,
            message: "`(` is never closed: A1111 weights the rest of the prompt ×1.1".to_string(),
        });
    }
    for &(start, at, _) in &square {
        multiply(&mut res, start, SQUARE);
        warnings.push(SyntaxWarning {
            column: at,
            message: "`[` is never closed: A1111 weights the rest of the prompt ÷1.1".to_string(),
        });
    }
    if res.is_empty() {
        res.push(WeightedText::new("", 1.0));
    }
    // Merge runs of identical weights.
    let mut merged: Vec<WeightedText> = Vec::with_capacity(res.len());
    for piece in res {
        match merged.last_mut() {
            Some(last) if last.weight == piece.weight => last.text.push_str(&piece.text),
            _ => merged.push(piece),
        }
    }
    warnings.sort_by_key(|w| w.column);
    Ok(ParsedPrompt {
        pieces: merged,
        warnings,
    })
}

/// Python's `float(text)` for the strings a prompt weight can be: surrounding whitespace,
/// a sign, `inf` / `nan`, and `_` between digits are accepted.
fn python_float(text: &str) -> Option<f64> {
    let trimmed = text.trim();
    let digits_around = |i: usize| {
        let bytes = trimmed.as_bytes();
        i > 0
            && i + 1 < bytes.len()
            && bytes[i - 1].is_ascii_digit()
            && bytes[i + 1].is_ascii_digit()
    };
    if trimmed
        .char_indices()
        .any(|(i, c)| c == '_' && !digits_around(i))
    {
        return None;
    }
    trimmed.replace('_', "").parse::<f64>().ok()
}

const COMFY_ESCAPED_CLOSE: &str = "\u{0}\u{1}";
const COMFY_ESCAPED_OPEN: &str = "\u{0}\u{2}";

/// ComfyUI's `token_weights(escape_important(text), 1.0)`, each text unescaped, with
/// warnings where parentheses are unbalanced.
///
/// `((x:1.5))` gives `x` 1.5 (the number replaces the weight); `(x)` 1.1; `[x]` is text.
pub fn parse_comfy(text: &str) -> Result<ParsedPrompt, SyntaxError> {
    let escaped = text
        .replace("\\)", COMFY_ESCAPED_CLOSE)
        .replace("\\(", COMFY_ESCAPED_OPEN);
    let mut pieces = Vec::new();
    comfy_token_weights(&escaped, 1.0, &mut pieces)?;
    for piece in &mut pieces {
        piece.text = piece
            .text
            .replace(COMFY_ESCAPED_CLOSE, ")")
            .replace(COMFY_ESCAPED_OPEN, "(");
    }
    // Escapes are two characters before and after, so columns of `escaped` are the text's.
    let mut warnings = Vec::new();
    let mut nesting = 0i64;
    let mut opened_at = 0usize;
    for (i, c) in escaped.chars().enumerate() {
        match c {
            '(' => {
                if nesting == 0 {
                    opened_at = i + 1;
                }
                nesting += 1;
            }
            ')' => {
                nesting -= 1;
                if nesting == -1 {
                    warnings.push(SyntaxWarning {
                        column: i + 1,
                        message: "`)` closes no parenthesis: ComfyUI keeps it as text and pairs the parentheses after it differently".to_string(),
                    });
                }
            }
            _ => {}
        }
    }
    if nesting > 0 {
        warnings.push(SyntaxWarning {
            column: opened_at,
            message:
                "`(` is never closed: ComfyUI reads it and the rest of the prompt as plain text"
                    .to_string(),
        });
    }
    if let Some(at) = text.find("embedding:") {
        warnings.push(SyntaxWarning {
            column: column(text, at),
            message: "ComfyUI's `embedding:NAME` is not read: declare the embedding under `models:` and write its `token`".to_string(),
        });
    }
    Ok(ParsedPrompt { pieces, warnings })
}

/// ComfyUI's `parse_parentheses`.
fn comfy_parse_parentheses(string: &str) -> Vec<String> {
    let mut result = Vec::new();
    let mut current = String::new();
    let mut nesting = 0i64;
    for c in string.chars() {
        match c {
            '(' => {
                if nesting == 0 {
                    if !current.is_empty() {
                        result.push(std::mem::take(&mut current));
                    }
                    current = "(".to_string();
                } else {
                    current.push(c);
                }
                nesting += 1;
            }
            ')' => {
                nesting -= 1;
                if nesting == 0 {
                    current.push(')');
                    result.push(std::mem::take(&mut current));
                } else {
                    current.push(c);
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        result.push(current);
    }
    result
}

/// ComfyUI's `token_weights`.
fn comfy_token_weights(
    string: &str,
    current: f64,
    out: &mut Vec<WeightedText>,
) -> Result<(), SyntaxError> {
    for item in comfy_parse_parentheses(string) {
        let grouped = item.chars().count() >= 2 && item.starts_with('(') && item.ends_with(')');
        if !grouped {
            out.push(WeightedText {
                text: item,
                weight: current,
            });
            continue;
        }
        let mut inner = &item[1..item.len() - 1];
        let mut weight = current * 1.1;
        if let Some(colon) = inner.rfind(':').filter(|&c| c > 0) {
            if let Some(value) = python_float(&inner[colon + 1..]) {
                if !value.is_finite() {
                    return Err(SyntaxError {
                        column: 0,
                        message: format!("the weight `{}` is not finite", &inner[colon + 1..]),
                    });
                }
                weight = value;
                inner = &inner[..colon];
            }
        }
        comfy_token_weights(inner, weight, out)?;
    }
    Ok(())
}

/// One CLIP context of a prompt: BOS, 75 tokens (padded), EOS; with one weight per id.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
    /// How many of the ids are the prompt's (neither BOS / EOS nor padding).
    pub tokens: usize,
}

impl TokenChunk {
    /// Whether every weight is 1 (the encoding is used as it is).
    pub fn unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// A prompt read in a syntax and tokenised for one text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    pub syntax: PromptSyntax,
    pub pieces: Vec<WeightedText>,
    pub chunks: Vec<TokenChunk>,
    /// The prompt's token count before truncation (plain syntax cuts after one chunk).
    pub total_tokens: usize,
}

/// The chunk of the empty prompt, `[BOS, EOS, pad, …]` (A1111's `empty_chunk` after its
/// padding, ComfyUI's `gen_empty_tokens`, diffusers' tokenisation of "").
pub fn empty_chunk(tokenizer: &ClipTokenizer) -> TokenChunk {
    let mut closer = ChunkCloser::new(tokenizer);
    closer.close(Vec::new(), Vec::new());
    closer.chunks.remove(0)
}

/// Pads chunks and wraps them in BOS / EOS.
struct ChunkCloser {
    bos: u32,
    eos: u32,
    pad: u32,
    length: usize,
    chunks: Vec<TokenChunk>,
}

impl ChunkCloser {
    fn new(tokenizer: &ClipTokenizer) -> Self {
        Self {
            bos: tokenizer.bos_id(),
            eos: tokenizer.eos_id(),
            pad: tokenizer.pad_id(),
            length: tokenizer.max_len().saturating_sub(2).max(1),
            chunks: Vec::new(),
        }
    }

    /// A1111's `next_chunk`: pad with EOS to 75, wrap in BOS / EOS; then (its
    /// `process_tokens`) every id after the first EOS becomes the pad id where that differs.
    fn close(&mut self, mut ids: Vec<u32>, mut weights: Vec<f64>) {
        let tokens = ids.len();
        ids.resize(self.length.max(tokens), self.eos);
        weights.resize(self.length.max(tokens), 1.0);
        let mut full = Vec::with_capacity(ids.len() + 2);
        full.push(self.bos);
        full.extend(ids);
        full.push(self.eos);
        let mut all_weights = Vec::with_capacity(weights.len() + 2);
        all_weights.push(1.0);
        all_weights.extend(weights);
        all_weights.push(1.0);
        if self.pad != self.eos {
            if let Some(first) = full.iter().position(|&id| id == self.eos) {
                for id in &mut full[first + 1..] {
                    *id = self.pad;
                }
            }
        }
        self.chunks.push(TokenChunk {
            ids: full,
            weights: all_weights,
            tokens,
        });
    }
}

/// Tokenises `prompt` for one encoder's tokenizer in `syntax`, into chunks of 77 ids.
pub fn tokenize_prompt(
    tokenizer: &ClipTokenizer,
    prompt: &str,
    syntax: PromptSyntax,
) -> Result<TokenizedPrompt, SyntaxError> {
    let parsed = parse(prompt, syntax)?;
    let (chunks, total_tokens) = match syntax {
        PromptSyntax::A1111 => chunk_a1111(tokenizer, &parsed.pieces),
        PromptSyntax::Comfy => chunk_comfy(tokenizer, &parsed.pieces),
        PromptSyntax::Plain => {
            // The tokenizer's own `encode`: BOS, at most 75 tokens, EOS, padding.
            let length = tokenizer.max_len();
            let content = tokenizer.content_ids_of(prompt);
            let total = content.len();
            let tokens = total.min(length.saturating_sub(2));
            let mut ids = Vec::with_capacity(length);
            ids.push(tokenizer.bos_id());
            ids.extend_from_slice(&content[..tokens]);
            ids.push(tokenizer.eos_id());
            ids.resize(length, tokenizer.pad_id());
            let chunk = TokenChunk {
                weights: vec![1.0; ids.len()],
                ids,
                tokens,
            };
            (vec![chunk], total)
        }
    };
    Ok(TokenizedPrompt {
        syntax,
        pieces: parsed.pieces,
        chunks,
        total_tokens,
    })
}

/// A1111's `tokenize_line` (`sd_hijack_clip.py`).
fn chunk_a1111(tokenizer: &ClipTokenizer, pieces: &[WeightedText]) -> (Vec<TokenChunk>, usize) {
    let mut closer = ChunkCloser::new(tokenizer);
    let length = closer.length;
    let comma = tokenizer.token_id(",</w>");
    let mut ids: Vec<u32> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let mut total = 0;
    for piece in pieces {
        if piece.is_break() {
            closer.close(std::mem::take(&mut ids), std::mem::take(&mut weights));
            last_comma = None;
            continue;
        }
        let tokens = tokenizer.content_ids_of(&piece.text);
        total += tokens.len();
        let mut position = 0;
        while position < tokens.len() {
            let token = tokens[position];
            if Some(token) == comma {
                last_comma = Some(ids.len());
            } else if let Some(at) = last_comma.filter(|&at| {
                COMMA_PADDING_BACKTRACK != 0
                    && ids.len() == length
                    && ids.len() - at <= COMMA_PADDING_BACKTRACK
            }) {
                let moved_ids = ids.split_off(at + 1);
                let moved_weights = weights.split_off(at + 1);
                closer.close(
                    std::mem::replace(&mut ids, moved_ids),
                    std::mem::replace(&mut weights, moved_weights),
                );
                last_comma = None;
            }
            if ids.len() == length {
                closer.close(std::mem::take(&mut ids), std::mem::take(&mut weights));
                last_comma = None;
            }
            match tokenizer.added_word_at(&tokens, position) {
                // A textual-inversion word is never split across chunks.
                Some(len) => {
                    if ids.len() + len > length {
                        closer.close(std::mem::take(&mut ids), std::mem::take(&mut weights));
                        last_comma = None;
                    }
                    ids.extend_from_slice(&tokens[position..position + len]);
                    weights.extend(std::iter::repeat_n(piece.weight, len));
                    position += len;
                }
                None => {
                    ids.push(token);
                    weights.push(piece.weight);
                    position += 1;
                }
            }
        }
    }
    if !ids.is_empty() || closer.chunks.is_empty() {
        closer.close(ids, weights);
    }
    (closer.chunks, total)
}

/// ComfyUI's `tokenize_with_weights` (`sd1_clip.py`): each weighted segment is a group.
fn chunk_comfy(tokenizer: &ClipTokenizer, pieces: &[WeightedText]) -> (Vec<TokenChunk>, usize) {
    let bos = tokenizer.bos_id();
    let eos = tokenizer.eos_id();
    let pad = tokenizer.pad_id();
    let max_length = tokenizer.max_len().max(3);
    let mut total = 0;
    let mut batches: Vec<Vec<(u32, f64)>> = Vec::new();
    let mut batch: Vec<(u32, f64)> = vec![(bos, 1.0)];
    for piece in pieces.iter().filter(|p| !p.text.is_empty()) {
        let group: Vec<(u32, f64)> = tokenizer
            .content_ids_of(&piece.text)
            .into_iter()
            .map(|id| (id, piece.weight))
            .collect();
        total += group.len();
        let is_large = group.len() >= COMFY_MAX_WORD_LENGTH;
        let mut rest: &[(u32, f64)] = &group;
        while !rest.is_empty() {
            if rest.len() + batch.len() > max_length - 1 {
                let remaining = max_length - batch.len() - 1;
                if is_large {
                    batch.extend_from_slice(&rest[..remaining]);
                    batch.push((eos, 1.0));
                    rest = &rest[remaining..];
                } else {
                    batch.push((eos, 1.0));
                    batch.extend(std::iter::repeat_n((pad, 1.0), remaining));
                }
                batches.push(std::mem::replace(&mut batch, vec![(bos, 1.0)]));
            } else {
                batch.extend_from_slice(rest);
                rest = &[];
            }
        }
    }
    batch.push((eos, 1.0));
    let fill = max_length.saturating_sub(batch.len());
    batch.extend(std::iter::repeat_n((pad, 1.0), fill));
    batches.push(batch);
    let chunks = batches
        .into_iter()
        .map(|batch| {
            let tokens = batch
                .iter()
                .skip(1)
                .take_while(|(id, _)| *id != eos)
                .count();
            let (ids, weights) = batch.into_iter().unzip();
            TokenChunk {
                ids,
                weights,
                tokens,
            }
        })
        .collect();
    (chunks, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(parsed: &ParsedPrompt) -> Vec<(&str, f64)> {
        parsed
            .pieces
            .iter()
            .map(|p| (p.text.as_str(), p.weight))
            .collect()
    }

    fn a1111(text: &str) -> Vec<(String, f64)> {
        parse_a1111(text)
            .unwrap()
            .pieces
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect()
    }

    fn owned(expected: &[(&str, f64)]) -> Vec<(String, f64)> {
        expected.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    #[test]
    fn a1111_doc_examples() {
        // The doctests of A1111's modules/prompt_parser.py, weights to the last bit.
        assert_eq!(a1111("normal text"), owned(&[("normal text", 1.0)]));
        assert_eq!(
            a1111("an (important) word"),
            owned(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(a1111("(unbalanced"), owned(&[("unbalanced", 1.1)]));
        assert_eq!(a1111("\\(literal\\]"), owned(&[("(literal]", 1.0)]));
        assert_eq!(
            a1111("(unnecessary)(parens)"),
            owned(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            a1111("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            owned(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn a1111_breaks_escapes_and_stray_brackets() {
        let parsed = parse_a1111("a cat BREAK a dog").unwrap();
        assert_eq!(
            pieces(&parsed),
            vec![("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
        );
        assert!(parsed.pieces[1].is_break());
        // Inside brackets the marker is multiplied and becomes the word.
        let inside = parse_a1111("(x BREAK y)").unwrap();
        assert!(inside.pieces.iter().all(|p| !p.is_break()));
        assert_eq!(
            a1111("\\\\ and \\[x\\] and \\"),
            owned(&[("\\ and [x] and ", 1.0)])
        );
        assert_eq!(a1111(""), owned(&[("", 1.0)]));
        assert_eq!(a1111("a) b]"), owned(&[("a) b]", 1.0)]));
        assert_eq!(a1111("x:1.5) y"), owned(&[("x:1.5) y", 1.0)]));
        assert_eq!(a1111("[x:1.3]"), owned(&[("x:1.3", 1.0 / 1.1)]));
        assert_eq!(a1111("(x:-0.5)"), owned(&[("x", -0.5)]));
    }

    #[test]
    fn a1111_warnings_carry_columns() {
        let parsed = parse_a1111("a (cat) dog) and [mouse").unwrap();
        let columns: Vec<usize> = parsed.warnings.iter().map(|w| w.column).collect();
        assert_eq!(columns, vec![12, 18], "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].message.contains("kept as text"));
        assert!(parsed.warnings[1].message.contains("never closed"));
        let editing = parse_a1111("a [cat:dog:0.5] and [x|y]").unwrap();
        let columns: Vec<usize> = editing.warnings.iter().map(|w| w.column).collect();
        assert_eq!(columns, vec![3, 21]);
        let lone = parse_a1111("é\\x").unwrap();
        assert_eq!(lone.warnings[0].column, 2, "columns count characters");
        assert!(parse_a1111("fine (text:1.2)").unwrap().warnings.is_empty());
    }

    #[test]
    fn a1111_bad_numbers_are_errors_with_their_column() {
        let error = parse_a1111("a (cat:1.2.3) b").unwrap_err();
        assert_eq!(error.column, 8);
        assert!(error.message.contains("1.2.3"), "{error}");
        assert!(parse_a1111("(x:.)").is_err());
        // Without an open bracket the same text is only text.
        assert_eq!(a1111("x:1.2.3)"), owned(&[("x:1.2.3)", 1.0)]));
    }

    #[test]
    fn python_floats() {
        assert_eq!(python_float(" 1.5 "), Some(1.5));
        assert_eq!(python_float("1."), Some(1.0));
        assert_eq!(python_float(".5"), Some(0.5));
        assert_eq!(python_float("+.5"), Some(0.5));
        assert_eq!(python_float("1_0"), Some(10.0));
        assert_eq!(python_float("1e2"), Some(100.0));
        assert_eq!(python_float("_1"), None);
        assert_eq!(python_float("1.2.3"), None);
        assert_eq!(python_float("abc"), None);
    }

    #[test]
    fn comfy_weights_set_rather_than_multiply() {
        let parsed = parse_comfy("a ((x:1.5)) (y) [z] \\(w\\)").unwrap();
        assert_eq!(
            pieces(&parsed),
            vec![
                ("a ", 1.0),
                ("x", 1.5),
                (" ", 1.0),
                ("y", 1.1),
                (" [z] (w)", 1.0)
            ]
        );
        assert!(parsed.warnings.is_empty());
        let nested = parse_comfy("((a) b)").unwrap();
        assert_eq!(pieces(&nested), vec![("a", 1.1 * 1.1), (" b", 1.1)]);
        // A colon with no number stays in the text.
        let colon = parse_comfy("(a: b)").unwrap();
        assert_eq!(pieces(&colon), vec![("a: b", 1.1)]);
        assert_eq!(pieces(&parse_comfy("").unwrap()), Vec::<(&str, f64)>::new());
    }

    #[test]
    fn comfy_unbalanced_parentheses() {
        let open = parse_comfy("a (b c").unwrap();
        assert_eq!(pieces(&open), vec![("a ", 1.0), ("(b c", 1.0)]);
        assert_eq!(open.warnings.len(), 1);
        assert_eq!(open.warnings[0].column, 3);
        let stray = parse_comfy("a) (b)").unwrap();
        assert_eq!(pieces(&stray), vec![("a) (b)", 1.0)]);
        assert_eq!(stray.warnings[0].column, 2);
    }

    #[test]
    fn syntax_names() {
        for name in PromptSyntax::NAMES.split(", ") {
            assert_eq!(PromptSyntax::parse(name).unwrap().name(), name);
        }
        assert_eq!(PromptSyntax::parse("COMFY"), Some(PromptSyntax::Comfy));
        assert_eq!(PromptSyntax::parse("compel"), None);
        assert_eq!(PromptSyntax::default(), PromptSyntax::A1111);
    }

    fn tiny_tokenizer() -> ClipTokenizer {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd15");
        ClipTokenizer::from_folder(&dir.join("tokenizer")).unwrap()
    }

    #[test]
    fn short_unweighted_prompts_tokenize_as_diffusers() {
        let tokenizer = tiny_tokenizer();
        for syntax in [
            PromptSyntax::A1111,
            PromptSyntax::Comfy,
            PromptSyntax::Plain,
        ] {
            for prompt in ["a cozy house at dusk", "lowres, blurry", ""] {
                let tokenized = tokenize_prompt(&tokenizer, prompt, syntax).unwrap();
                assert_eq!(tokenized.chunks.len(), 1);
                assert_eq!(tokenized.chunks[0].ids, tokenizer.encode(prompt).unwrap());
                assert!(tokenized.chunks[0].unweighted());
            }
        }
        assert_eq!(
            empty_chunk(&tokenizer).ids,
            tokenizer.encode("").unwrap(),
            "the empty chunk"
        );
    }

    #[test]
    fn a1111_chunks_backtrack_to_the_last_comma() {
        let tokenizer = tiny_tokenizer();
        let word = tokenizer.content_ids_of("house");
        assert_eq!(word.len(), 1);
        // 70 words, a comma, then 10 more: the chunk fills at 75 with the comma 4 back.
        let prompt = format!("{}, {}", "house ".repeat(70), "house ".repeat(10));
        let tokenized = tokenize_prompt(&tokenizer, &prompt, PromptSyntax::A1111).unwrap();
        let counts: Vec<usize> = tokenized.chunks.iter().map(|c| c.tokens).collect();
        assert_eq!(counts, vec![71, 10]);
        assert_eq!(tokenized.total_tokens, 81);
        for chunk in &tokenized.chunks {
            assert_eq!(chunk.ids.len(), 77);
            assert_eq!(chunk.ids[0], tokenizer.bos_id());
            assert_eq!(chunk.ids[76], tokenizer.eos_id());
        }
        // Without a comma near the end: a plain cut at 75.
        let far = format!("{}, {}", "house ".repeat(40), "house ".repeat(41));
        let tokenized = tokenize_prompt(&tokenizer, &far, PromptSyntax::A1111).unwrap();
        let counts: Vec<usize> = tokenized.chunks.iter().map(|c| c.tokens).collect();
        assert_eq!(counts, vec![75, 7]);
        // Plain: one chunk, cut.
        let plain = tokenize_prompt(&tokenizer, &far, PromptSyntax::Plain).unwrap();
        assert_eq!(plain.chunks.len(), 1);
        assert_eq!(plain.total_tokens, 82);
        assert_eq!(plain.chunks[0].ids, tokenizer.encode(&far).unwrap());
    }

    #[test]
    fn a1111_break_starts_a_chunk_and_weights_follow_tokens() {
        let tokenizer = tiny_tokenizer();
        let tokenized = tokenize_prompt(
            &tokenizer,
            "a (house:1.5) BREAK [dusk]",
            PromptSyntax::A1111,
        )
        .unwrap();
        assert_eq!(tokenized.chunks.len(), 2);
        let first = &tokenized.chunks[0];
        assert_eq!(first.tokens, 2);
        assert_eq!(&first.weights[..4], &[1.0, 1.0, 1.5, 1.0]);
        let second = &tokenized.chunks[1];
        let dusk = tokenizer.content_ids_of("dusk").len();
        assert_eq!(second.tokens, dusk);
        assert!(second.weights[1..1 + dusk].iter().all(|&w| w == 1.0 / 1.1));
        // BREAK as the whole prompt: an empty chunk, then the empty rest.
        let only = tokenize_prompt(&tokenizer, "BREAK", PromptSyntax::A1111).unwrap();
        assert_eq!(only.chunks.len(), 1);
    }

    #[test]
    fn comfy_groups_move_whole_unless_large() {
        let tokenizer = tiny_tokenizer();
        // 74 single-token words, then a weighted group of 3 tokens: it moves to chunk 2.
        let prompt = format!("{}(house house house:1.2)", "house ".repeat(74));
        let tokenized = tokenize_prompt(&tokenizer, &prompt, PromptSyntax::Comfy).unwrap();
        let counts: Vec<usize> = tokenized.chunks.iter().map(|c| c.tokens).collect();
        assert_eq!(counts, vec![74, 3]);
        assert!(tokenized.chunks[1].weights[1..4].iter().all(|&w| w == 1.2));
        // A group of 8 or more is split at the boundary.
        let large = format!(
            "{}(house house house house house house house house:1.2)",
            "house ".repeat(74)
        );
        let tokenized = tokenize_prompt(&tokenizer, &large, PromptSyntax::Comfy).unwrap();
        let counts: Vec<usize> = tokenized.chunks.iter().map(|c| c.tokens).collect();
        assert_eq!(counts, vec![75, 7]);
        for chunk in &tokenized.chunks {
            assert_eq!(chunk.ids.len(), 77);
        }
    }
}
