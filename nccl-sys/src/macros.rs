//! `nccl_functions!`: turns the generated list `name = "since", …` (end of `functions.rs`) into the loader's
//! per-symbol cache, one getter method per function on [`Library`](crate::Library), [`FUNCTIONS`](crate::FUNCTIONS)
//! and [`symbol_since`](crate::symbol_since).

macro_rules! nccl_functions {
    ($($name:ident = $since:literal,)*) => {
        /// Every function of `nccl.h` these bindings bind, with the NCCL version (`"major.minor"`) that
        /// introduced it, sorted by name.
        pub const FUNCTIONS: &[(&str, &str)] = &[$((stringify!($name), $since),)*];

        /// One lazily filled slot per function: `None` once looked up and found missing.
        #[allow(non_snake_case)]
        #[derive(Default)]
        pub(crate) struct Symbols {
            $($name: ::std::sync::OnceLock<Option<sig::$name>>,)*
        }

        #[allow(non_snake_case)]
        impl crate::Library {
            $(
                #[doc = concat!(
                    "`", stringify!($name), "` (NCCL ", $since, " and newer), resolved on first use and cached.\n\n",
                    "See [`sig::", stringify!($name), "`] for the signature and the header's documentation. ",
                    "Calling the returned pointer is `unsafe`: the caller upholds NCCL's contract for it. The ",
                    "pointer stays valid for the life of the process (libnccl is never unloaded).\n\n",
                    "# Errors\n[`LoadError::MissingSymbol`](crate::LoadError::MissingSymbol) naming NCCL ", $since,
                    " when the loaded library does not export it (it is older)."
                )]
                pub fn $name(&self) -> Result<sig::$name, crate::LoadError> {
                    let slot = self.symbols.$name.get_or_init(|| {
                        #[cfg(feature = "link")]
                        if self.is_linked() {
                            return Some(linked::$name as sig::$name);
                        }
                        // SAFETY: `sig::$name` is the type bindgen derived from this symbol's declaration in
                        // nccl.h, so reading the symbol as that function-pointer type is what the C ABI
                        // promises; the name is NUL-terminated.
                        unsafe { self.raw_symbol::<sig::$name>(concat!(stringify!($name), "\0").as_bytes()) }
                    });
                    slot.ok_or(crate::LoadError::MissingSymbol {
                        symbol: stringify!($name),
                        needs: $since,
                        loaded: self.version_code(),
                    })
                }
            )*

            /// Resolves every bound function, returning each name with the outcome (in [`FUNCTIONS`] order).
            pub fn resolve_all(&self) -> Vec<(&'static str, Result<(), crate::LoadError>)> {
                vec![$((stringify!($name), self.$name().map(|_| ())),)*]
            }
        }

        /// The NCCL version (`"major.minor"`) that introduced the function `name`, or `None` if these
        /// bindings do not bind it. For example `symbol_since("ncclAlltoAll") == Some("2.28")`.
        pub fn symbol_since(name: &str) -> Option<&'static str> {
            match name {
                $(stringify!($name) => Some($since),)*
                _ => None,
            }
        }
    };
}
