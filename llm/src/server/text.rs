//! Turning a sequence's tokens into text deltas as they come: incremental detokenization, stop strings
//! (held back while they may still be starting, cut where they match), and the id form used by models
//! without a tokenizer.

use std::sync::Arc;

/// Text of a sequence so far, and what of it was already handed out.
pub struct TextState {
    tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    stop: Vec<String>,
    ids: Vec<u32>,
    /// Bytes of the text already handed out.
    sent: usize,
    /// The text so far (tokenizer models) or the ids as text (` 12 34`).
    text: String,
}

/// What one new token adds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// New text that is final (may be empty while a stop string or a multi-byte character is pending).
    pub text: String,
    /// A stop string matched: the sequence ends here and the stop string is not part of the text.
    pub stopped: bool,
}

impl TextState {
    /// An empty state. `stop` strings must be non-empty (checked by the API layer).
    pub fn new(tokenizer: Option<Arc<tokenizers::Tokenizer>>, stop: Vec<String>) -> Self {
        TextState {
            tokenizer,
            stop,
            ids: Vec::new(),
            sent: 0,
            text: String::new(),
        }
    }

    /// The text of `ids` (every id as ` {id}` without a tokenizer; special tokens skipped).
    fn render(&self) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(&self.ids, true).unwrap_or_default(),
            None => self.ids.iter().map(|i| format!(" {i}")).collect(),
        }
    }

    /// Adds one token and returns the text that became final.
    pub fn push(&mut self, token: u32) -> Delta {
        self.ids.push(token);
        let full = self.render();
        // A stop string anywhere past what was already sent (text before `sent` never contained one).
        let from = floor_char(&full, self.sent.saturating_sub(self.max_stop()));
        let hit = self
            .stop
            .iter()
            .filter_map(|s| full[from..].find(s.as_str()).map(|p| from + p))
            .min();
        if let Some(cut) = hit {
            let cut = cut.max(self.sent);
            let text = full.get(self.sent..cut).unwrap_or_default().to_string();
            self.sent = cut;
            self.text = full[..cut].to_string();
            return Delta { text, stopped: true };
        }
        // Hold back an unfinished character (the decoder shows it as U+FFFD) and any tail that may be the
        // start of a stop string.
        let mut end = full.len();
        if full.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let hold = self
            .stop
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
            .filter(|p| full[..end].ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        end -= hold;
        let text = if end > self.sent && full.is_char_boundary(end) && full.is_char_boundary(self.sent) {
            let t = full[self.sent..end].to_string();
            self.sent = end;
            t
        } else {
            String::new()
        };
        self.text = full;
        Delta { text, stopped: false }
    }

    /// Everything not handed out yet (at the end of a sequence that did not stop on a stop string).
    pub fn flush(&mut self) -> String {
        let rest = self.text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = self.text.len();
        rest
    }

    fn max_stop(&self) -> usize {
        self.stop.iter().map(String::len).max().unwrap_or(0)
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(stop: &[&str], tokens: &[u32]) -> (String, bool) {
        let mut st = TextState::new(None, stop.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for &t in tokens {
            let d = st.push(t);
            out += &d.text;
            if d.stopped {
                return (out, true);
            }
        }
        out += &st.flush();
        (out, false)
    }

    #[test]
    fn ids_render_and_stop_strings_cut_and_hold_back() {
        assert_eq!(all(&[], &[5, 17]), (" 5 17".to_string(), false));
        // " 1 2 3 4": stop " 3" cuts before it; nothing of the stop string is ever sent.
        assert_eq!(all(&[" 3"], &[1, 2, 3, 4]), (" 1 2".to_string(), true));
        // A tail that could start a stop string is held back, then released when it does not match.
        let mut st = TextState::new(None, vec![" 9 9".into()]);
        assert_eq!(st.push(1).text, " 1");
        assert_eq!(st.push(9).text, "", "' 9' may start ' 9 9'");
        assert_eq!(st.push(2).text, " 9 2");
        assert_eq!(st.flush(), "");
        // The stop string spans two tokens.
        assert_eq!(all(&["1 2"], &[7, 1, 2]), (" 7 ".to_string(), true));
    }
}
