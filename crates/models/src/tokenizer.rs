//! CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` runs it for diffusers
//! (`padding="max_length", max_length=77, truncation=True`).
//!
//! transformers 5 builds `CLIPTokenizer` on the `tokenizers` library even when a folder only
//! has `vocab.json` + `merges.txt` (the SD repos ship no `tokenizer.json`). Its pipeline, which
//! this module reproduces:
//!
//! 1. special tokens (bos, eos, unk, pad) are cut out of the text first; with SD2's pad token
//!    `!` every `!` in a prompt becomes token `!` (id 0), not part of a word;
//! 2. each remaining piece is NFC-normalised, runs of whitespace become one space, and it is
//!    lower-cased character by character (no ftfy, no HTML unescaping, unlike OpenAI's
//!    original tokenizer: `&amp;` stays three words);
//! 3. the CLIP regex picks words (whitespace between them is dropped), each word's UTF-8
//!    bytes are mapped to printable characters, and BPE runs with `</w>` on the last symbol;
//! 4. `<|startoftext|>` … `<|endoftext|>`, the content truncated to `max_len − 2` tokens, then
//!    right-padding with the pad token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

/// The context length of every Stable Diffusion text encoder.
pub const DEFAULT_MAX_LEN: usize = 77;

const BOS_TOKEN: &str = "<|startoftext|>";
const EOS_TOKEN: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// CLIP's pre-tokenisation pattern. transformers' fast tokenizer applies it without the
/// slow tokenizer's IGNORECASE, which makes no difference after lower-casing.
const WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer file {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("tokenizer file {path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("the token {0:?} is already a word of the tokenizer (choose another `token:`)")]
    TokenExists(String),
    #[error("the {role} token {token:?} is not in the vocabulary {path}")]
    MissingSpecialToken {
        role: &'static str,
        token: String,
        path: PathBuf,
    },
    #[error("tokenizer pattern failed to compile: {0}")]
    Pattern(#[from] regex::Error),
}

/// A token that is matched in the text before normal tokenisation.
#[derive(Debug, Clone)]
struct SpecialToken {
    content: String,
    id: u32,
    /// Matched on the normalised text (lower-cased etc.) rather than the raw input, as the
    /// `tokenizers` library does for added tokens with `normalized: true`.
    matches_normalized_text: bool,
}

/// A special token as named in `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Clone)]
struct SpecialTokenSetting {
    content: String,
    normalized: bool,
}

impl SpecialTokenSetting {
    fn plain(content: &str) -> Self {
        // transformers marks special tokens given as plain strings as not normalised.
        Self {
            content: content.to_owned(),
            normalized: false,
        }
    }

    /// Reads a string or an `AddedToken` object (`{"content": …, "normalized": …}`).
    fn from_json(value: &Value) -> Option<Self> {
        match value {
            Value::String(content) => Some(Self::plain(content)),
            Value::Object(fields) => Some(Self {
                content: fields.get("content")?.as_str()?.to_owned(),
                normalized: fields
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct SpecialTokenSettings {
    bos: SpecialTokenSetting,
    eos: SpecialTokenSetting,
    unk: SpecialTokenSetting,
    pad: SpecialTokenSetting,
    max_len: usize,
}

/// A merge rule: the rank (lower merges first) and the id of the merged symbol.
#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    merged_id: u32,
}

/// The CLIP tokenizer. `encode` always returns exactly `max_len()` ids.
#[derive(Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    merges: HashMap<(u32, u32), Merge>,
    byte_to_char: [char; 256],
    word_pattern: Regex,
    whitespace_runs: Regex,
    /// Longest first, so alternatives sharing a prefix match leftmost-longest.
    special_tokens: Vec<SpecialToken>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_len: usize,
    /// BPE result per byte-mapped word; prompts repeat words a lot.
    word_cache: Mutex<HashMap<String, Vec<u32>>>,
    /// Added words with several tokens (textual inversion): word → its tokens, space-separated,
    /// substituted in the text before tokenising (diffusers' `maybe_convert_prompt`).
    expansions: Vec<(String, String)>,
    /// Added words (textual inversion): the first id and how many consecutive ids each has.
    added_words: Vec<(u32, usize)>,
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `vocab.json`, `merges.txt` and, when present,
    /// `tokenizer_config.json` then `special_tokens_map.json` (which wins) for the special
    /// tokens and `model_max_length`.
    pub fn from_folder(dir: &Path) -> Result<Self, TokenizerError> {
        let mut settings = SpecialTokenSettings::defaults(EOS_TOKEN);
        for file_name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file_name);
            if path.is_file() {
                settings.update_from(&path, &read_json(&path)?)?;
            }
        }
        Self::build(&dir.join("vocab.json"), &dir.join("merges.txt"), settings)
    }

    /// Loads `vocab.json` + `merges.txt` with the standard CLIP special tokens, padding with
    /// `pad_token` (`<|endoftext|>` for SD1.x / CLIP-L, `!` for SD2.x / OpenCLIP).
    pub fn from_files(
        vocab: &Path,
        merges: &Path,
        pad_token: &str,
    ) -> Result<Self, TokenizerError> {
        Self::build(vocab, merges, SpecialTokenSettings::defaults(pad_token))
    }

    fn build(
        vocab_path: &Path,
        merges_path: &Path,
        settings: SpecialTokenSettings,
    ) -> Result<Self, TokenizerError> {
        let vocab = read_vocab(vocab_path)?;
        let merges = read_merges(merges_path, &vocab)?;
        let lookup = |role: &'static str, setting: &SpecialTokenSetting| {
            vocab.get(&setting.content).copied().ok_or_else(|| {
                TokenizerError::MissingSpecialToken {
                    role,
                    token: setting.content.clone(),
                    path: vocab_path.to_path_buf(),
                }
            })
        };
        let bos_id = lookup("bos", &settings.bos)?;
        let eos_id = lookup("eos", &settings.eos)?;
        let unk_id = lookup("unk", &settings.unk)?;
        let pad_id = lookup("pad", &settings.pad)?;

        let mut special_tokens: Vec<SpecialToken> = Vec::new();
        for (setting, id) in [
            (&settings.bos, bos_id),
            (&settings.eos, eos_id),
            (&settings.unk, unk_id),
            (&settings.pad, pad_id),
        ] {
            if !special_tokens
                .iter()
                .any(|token| token.content == setting.content)
            {
                special_tokens.push(SpecialToken {
                    content: setting.content.clone(),
                    id,
                    matches_normalized_text: setting.normalized,
                });
            }
        }
        special_tokens.sort_by_key(|token| std::cmp::Reverse(token.content.len()));

        Ok(Self {
            vocab,
            merges,
            byte_to_char: byte_to_unicode(),
            word_pattern: Regex::new(WORD_PATTERN)?,
            whitespace_runs: Regex::new(r"\s+")?,
            special_tokens,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            max_len: settings.max_len,
            word_cache: Mutex::new(HashMap::new()),
            expansions: Vec::new(),
            added_words: Vec::new(),
        })
    }

    /// The next unused id: the vocabulary and every added token come before it.
    pub fn len(&self) -> usize {
        let vocab = self
            .vocab
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        let added = self
            .special_tokens
            .iter()
            .map(|t| t.id as usize + 1)
            .max()
            .unwrap_or(0);
        vocab.max(added)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `tokens` as new words (ids from [`Self::len`] on, in order) matched in the
    /// normalised text, as transformers' `add_tokens`; with several tokens, the first one in a
    /// prompt stands for all of them. Returns the first new id; an existing token is an error.
    pub fn add_word(&mut self, tokens: &[String]) -> Result<u32, TokenizerError> {
        let first = self.len() as u32;
        for token in tokens {
            let normalized = self.normalize(token);
            if self.vocab.contains_key(&format!("{normalized}</w>"))
                || self.special_tokens.iter().any(|t| t.content == normalized)
            {
                return Err(TokenizerError::TokenExists(token.clone()));
            }
        }
        for (i, token) in tokens.iter().enumerate() {
            let content = self.normalize(token);
            self.special_tokens.push(SpecialToken {
                content,
                id: first + i as u32,
                matches_normalized_text: true,
            });
        }
        self.special_tokens
            .sort_by_key(|token| std::cmp::Reverse(token.content.len()));
        if let [word, _, ..] = tokens {
            self.expansions.push((word.clone(), tokens.join(" ")));
            self.expansions
                .sort_by_key(|(w, _)| std::cmp::Reverse(w.len()));
        }
        self.added_words.push((first, tokens.len()));
        Ok(first)
    }

    /// How many ids the added word (textual inversion) starting at `ids[position]` spans, when
    /// one starts there with all its ids in order; `None` otherwise.
    pub fn added_word_at(&self, ids: &[u32], position: usize) -> Option<usize> {
        let first = *ids.get(position)?;
        let &(start, len) = self.added_words.iter().find(|(start, _)| *start == first)?;
        let run = ids.get(position..position + len)?;
        run.iter()
            .zip(start..)
            .all(|(id, expected)| *id == expected)
            .then_some(len)
    }

    /// The id of a vocabulary entry (`",</w>"` for the comma), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The ids of `text` without BOS / EOS, truncation or padding (multi-vector words
    /// expanded), as transformers' tokenizer with `add_special_tokens=False, truncation=False`
    /// after diffusers' `maybe_convert_prompt`.
    pub fn content_ids_of(&self, text: &str) -> Vec<u32> {
        self.content_ids(&self.expand(text))
    }

    /// The number of ids `encode` returns (the text encoder's context length).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The padding id (49407 for SD1.x, 0 for SD2.x / SDXL's second tokenizer).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `<|startoftext|>`'s id.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// `<|endoftext|>`'s id; the text encoders pool at its first occurrence.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Tokenises `text` into exactly `max_len()` ids: BOS, at most `max_len − 2` content
    /// tokens, EOS, then padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let content_budget = self.max_len - 2;
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos_id);
        let mut content = self.content_ids(&self.expand(text));
        content.truncate(content_budget);
        ids.extend(content);
        ids.push(self.eos_id);
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    /// `text` with each multi-vector word replaced by all its tokens.
    fn expand(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (word, tokens) in &self.expansions {
            text = text.replace(word.as_str(), tokens);
        }
        text
    }

    /// The ids of `text` without BOS/EOS, truncation or padding.
    fn content_ids(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for raw_piece in self.split_special(text, false) {
            match raw_piece {
                Piece::Special(id) => ids.push(id),
                Piece::Text(raw) => {
                    let normalized = self.normalize(raw);
                    for piece in self.split_special(&normalized, true) {
                        match piece {
                            Piece::Special(id) => ids.push(id),
                            Piece::Text(text) => {
                                for word in self.word_pattern.find_iter(text) {
                                    ids.extend(self.word_ids(word.as_str()));
                                }
                            }
                        }
                    }
                }
            }
        }
        ids
    }

    /// Splits `text` at the special tokens matched on raw (`normalized_stage = false`) or on
    /// normalised text, leftmost match first, longest token on ties.
    fn split_special<'a>(&self, text: &'a str, normalized_stage: bool) -> Vec<Piece<'a>> {
        let candidates: Vec<&SpecialToken> = self
            .special_tokens
            .iter()
            .filter(|token| {
                token.matches_normalized_text == normalized_stage && !token.content.is_empty()
            })
            .collect();
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let earliest = candidates
                .iter()
                .filter_map(|token| rest.find(&token.content).map(|position| (position, *token)))
                // Candidates are sorted longest first and min_by_key keeps the first minimum.
                .min_by_key(|(position, _)| *position);
            match earliest {
                Some((position, token)) => {
                    if position > 0 {
                        pieces.push(Piece::Text(&rest[..position]));
                    }
                    pieces.push(Piece::Special(token.id));
                    rest = &rest[position + token.content.len()..];
                }
                None => {
                    pieces.push(Piece::Text(rest));
                    rest = "";
                }
            }
        }
        pieces
    }

    /// NFC, whitespace runs to one space, per-character lower-casing (the `tokenizers`
    /// normaliser lower-cases each character on its own, so a final Σ becomes σ, not ς).
    fn normalize(&self, text: &str) -> String {
        let composed: String = text.nfc().collect();
        let single_spaced = self.whitespace_runs.replace_all(&composed, " ");
        single_spaced.chars().flat_map(char::to_lowercase).collect()
    }

    /// BPE ids of one pre-tokenised word.
    fn word_ids(&self, word: &str) -> Vec<u32> {
        let mapped: String = word
            .bytes()
            .map(|byte| self.byte_to_char[usize::from(byte)])
            .collect();
        let mut cache = self
            .word_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ids) = cache.get(&mapped) {
            return ids.clone();
        }
        let ids = self.byte_pair_encode(&mapped);
        cache.insert(mapped, ids.clone());
        ids
    }

    /// Merges the lowest-ranked adjacent pair until none applies. Symbols start as single
    /// characters, the last one carrying `</w>`; a symbol missing from the vocabulary is the
    /// unknown token (byte-level vocabularies contain every byte, so this is theoretical).
    fn byte_pair_encode(&self, mapped_word: &str) -> Vec<u32> {
        let characters: Vec<char> = mapped_word.chars().collect();
        let mut symbols: Vec<u32> = characters
            .iter()
            .enumerate()
            .map(|(index, character)| {
                let mut symbol = character.to_string();
                if index + 1 == characters.len() {
                    symbol.push_str(END_OF_WORD);
                }
                self.vocab.get(&symbol).copied().unwrap_or(self.unk_id)
            })
            .collect();
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|pair| self.merges.get(&(pair[0], pair[1])))
                .min_by_key(|merge| merge.rank)
                .copied();
            let Some(best) = best else { break };
            // Apply that merge at every non-overlapping occurrence, left to right.
            let mut merged = Vec::with_capacity(symbols.len());
            let mut index = 0;
            while index < symbols.len() {
                let is_best_pair = index + 1 < symbols.len()
                    && self
                        .merges
                        .get(&(symbols[index], symbols[index + 1]))
                        .is_some_and(|merge| merge.rank == best.rank);
                if is_best_pair {
                    merged.push(best.merged_id);
                    index += 2;
                } else {
                    merged.push(symbols[index]);
                    index += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }
}

#[derive(Debug)]
enum Piece<'a> {
    Text(&'a str),
    Special(u32),
}

impl SpecialTokenSettings {
    fn defaults(pad_token: &str) -> Self {
        Self {
            bos: SpecialTokenSetting::plain(BOS_TOKEN),
            eos: SpecialTokenSetting::plain(EOS_TOKEN),
            unk: SpecialTokenSetting::plain(EOS_TOKEN),
            pad: SpecialTokenSetting::plain(pad_token),
            max_len: DEFAULT_MAX_LEN,
        }
    }

    fn update_from(&mut self, path: &Path, config: &Value) -> Result<(), TokenizerError> {
        let Some(fields) = config.as_object() else {
            return Err(TokenizerError::Format {
                path: path.to_path_buf(),
                reason: "not a JSON object".to_owned(),
            });
        };
        for (key, slot) in [
            ("bos_token", &mut self.bos),
            ("eos_token", &mut self.eos),
            ("unk_token", &mut self.unk),
            ("pad_token", &mut self.pad),
        ] {
            match fields.get(key) {
                None | Some(Value::Null) => {}
                Some(value) => {
                    *slot = SpecialTokenSetting::from_json(value).ok_or_else(|| TokenizerError::Format {
                        path: path.to_path_buf(),
                        reason: format!("`{key}` must be a string or an object with \"content\", got {value}"),
                    })?;
                }
            }
        }
        // transformers stores "unset" as a huge sentinel; only a plausible context length counts.
        if let Some(max_len) = fields.get("model_max_length").and_then(Value::as_u64) {
            if (3..=1 << 20).contains(&max_len) {
                self.max_len = max_len as usize;
            }
        }
        Ok(())
    }
}

/// GPT-2's reversible byte → printable character table: printable Latin-1 bytes map to
/// themselves, the others to U+0100 upwards in byte order.
fn byte_to_unicode() -> [char; 256] {
    let is_printable = |byte: u32| {
        (0x21..=0x7E).contains(&byte)
            || (0xA1..=0xAC).contains(&byte)
            || (0xAE..=0xFF).contains(&byte)
    };
    let mut table = ['\0'; 256];
    let mut next_unprintable = 0u32;
    for byte in 0u32..256 {
        let code_point = if is_printable(byte) {
            byte
        } else {
            next_unprintable += 1;
            255 + next_unprintable
        };
        table[byte as usize] = char::from_u32(code_point).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    serde_json::from_str(&read_text(path)?).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>, TokenizerError> {
    let Value::Object(entries) = read_json(path)? else {
        return Err(TokenizerError::Format {
            path: path.to_path_buf(),
            reason: "expected an object mapping tokens to ids".to_owned(),
        });
    };
    entries
        .into_iter()
        .map(|(token, id)| {
            let id = id
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| TokenizerError::Format {
                    path: path.to_path_buf(),
                    reason: format!("token {token:?} has id {id}, expected a non-negative integer"),
                })?;
            Ok((token, id))
        })
        .collect()
}

/// Reads `merges.txt` (a `#version` header, then one `left right` pair per line; rank = order)
/// into a map over vocabulary ids, as the `tokenizers` BPE model stores it.
fn read_merges(
    path: &Path,
    vocab: &HashMap<String, u32>,
) -> Result<HashMap<(u32, u32), Merge>, TokenizerError> {
    let text = read_text(path)?;
    let mut merges = HashMap::new();
    let mut rank = 0u32;
    for (line_index, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let format_error = |reason: String| TokenizerError::Format {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", line_index + 1),
        };
        let mut parts = line.split(' ');
        let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format_error(format!(
                "expected two symbols separated by one space, got {line:?}"
            )));
        };
        let id_of = |symbol: &str| {
            vocab.get(symbol).copied().ok_or_else(|| {
                format_error(format!("merge symbol {symbol:?} is not in the vocabulary"))
            })
        };
        let left_id = id_of(left)?;
        let right_id = id_of(right)?;
        let merged_id = id_of(&format!("{left}{right}"))?;
        // A repeated pair keeps its first (best) rank.
        merges
            .entry((left_id, right_id))
            .or_insert(Merge { rank, merged_id });
        rank += 1;
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

    fn fixture(relative: &str) -> PathBuf {
        let path = Path::new(FIXTURES).join(relative);
        assert!(
            path.exists(),
            "fixture {} is missing; run tests/fixtures/make_fixtures.py",
            path.display()
        );
        path
    }

    fn reference_cases(set: &str) -> Vec<(String, Vec<u32>)> {
        let path = fixture("reference/tokens.json");
        let text = std::fs::read_to_string(&path).expect("tokens.json is readable");
        let tokens: Value = serde_json::from_str(&text).expect("tokens.json is JSON");
        let cases = tokens[set]
            .as_array()
            .unwrap_or_else(|| panic!("tokens.json has no {set:?} list"));
        assert!(!cases.is_empty(), "tokens.json {set:?} is empty");
        cases
            .iter()
            .map(|case| {
                let prompt = case["prompt"].as_str().expect("prompt string").to_owned();
                let ids = case["ids"]
                    .as_array()
                    .expect("ids list")
                    .iter()
                    .map(|id| id.as_u64().expect("integer id") as u32)
                    .collect();
                (prompt, ids)
            })
            .collect()
    }

    fn check_all(tokenizer: &ClipTokenizer, set: &str) {
        assert_eq!(tokenizer.max_len(), 77);
        for (prompt, expected) in reference_cases(set) {
            let actual = tokenizer.encode(&prompt).expect("encode");
            assert_eq!(actual, expected, "{set}: {prompt:?}");
        }
    }

    #[test]
    fn real_clip_vocabulary_matches_transformers() {
        let tokenizer = ClipTokenizer::from_files(
            &fixture("clip-vocab/vocab.json"),
            &fixture("clip-vocab/merges.txt"),
            EOS_TOKEN,
        )
        .expect("real CLIP tokenizer");
        check_all(&tokenizer, "real");
    }

    #[test]
    fn tiny_sd15_folder_matches_transformers() {
        let tokenizer = ClipTokenizer::from_folder(&fixture("tiny-sd15/tokenizer"))
            .expect("tiny SD1.5 tokenizer");
        check_all(&tokenizer, "tiny");
    }

    #[test]
    fn tiny_sd2_folder_pads_and_splits_on_bang() {
        let tokenizer =
            ClipTokenizer::from_folder(&fixture("tiny-sd2/tokenizer")).expect("tiny SD2 tokenizer");
        assert_eq!(tokenizer.pad_id(), 0);
        check_all(&tokenizer, "tiny_pad_bang");
    }

    #[test]
    fn long_prompt_keeps_eos_last() {
        let tokenizer =
            ClipTokenizer::from_folder(&fixture("tiny-sd15/tokenizer")).expect("tokenizer");
        let ids = tokenizer.encode(&"word ".repeat(200)).expect("encode");
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], tokenizer.bos_id());
        assert_eq!(ids[76], tokenizer.eos_id());
    }

    #[test]
    fn missing_files_are_named() {
        let missing = Path::new(FIXTURES).join("no-such-tokenizer");
        let error = ClipTokenizer::from_folder(&missing).expect_err("missing folder");
        assert!(error.to_string().contains("vocab.json"), "{error}");
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let table = byte_to_unicode();
        let mut sorted: Vec<char> = table.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], '\u{120}');
    }
}
