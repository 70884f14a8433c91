//! Printing an error with its causes, each cause once.
//!
//! Many error types (this crate's, the bootstrap's, `std::io`'s wrappers) both write their source's text into
//! their own message and return it from [`source`](std::error::Error::source), so walking the chain naively
//! prints the same words two or three times. [`chain`] walks it and leaves out every cause whose text is
//! already part of what was printed.

use std::error::Error;

/// `error`'s message, then `caused by: …` for each cause whose text is not already contained in the lines
/// before it. One line per entry.
pub fn chain(error: &dyn Error) -> String {
    let mut out = error.to_string();
    let mut printed = out.clone();
    let mut src = error.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !text.is_empty() && !printed.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text);
            printed.push('\n');
            printed.push_str(&text);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug)]
    struct E(String, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let root = E("port 29500 is in use".into(), None);
        let mid = E("bootstrap: port 29500 is in use".into(), Some(Box::new(root)));
        let top = E("rank 0: bootstrap: port 29500 is in use".into(), Some(Box::new(mid)));
        assert_eq!(chain(&top), "rank 0: bootstrap: port 29500 is in use");
        let io = E("permission denied".into(), None);
        let top = E("cannot open model.gguf".into(), Some(Box::new(io)));
        assert_eq!(chain(&top), "cannot open model.gguf\n  caused by: permission denied");
    }
}
