//! The generator behind the table of parameters in [`super`].

/// Turns the table of parameters into everything that lists them:
///
/// - `TOP_LEVEL_ONLY` and `ANYWHERE`, the known keys (for "did you mean");
/// - `ListenerConfig` and `ListenerConfig::parse`, from the `top_level` rows;
/// - from the `anywhere` rows: `GenericParams` (one level, as given),
///   `Params` (the effective values) and its `Default`, the merge
///   `Params::apply_fields`, and the parser arms `GenericParams::parse_field`.
///
/// An `anywhere` row is `name: Type = default, how parser, merge;` where
/// `how` says the parser's shape (see [`param_kind!`]'s `@parse`) and
/// `merge` how a level's value reaches `Params` (its `@merge`). The `peer`
/// and `via` blocks are not rows: they are the tree's structure, not values,
/// so `GenericParams` declares them after the rows and `parse_table` and
/// `Params::apply` handle them.
macro_rules! listener_params {
    (
        top_level {
            $( $(#[$top_doc:meta])* $top:ident: $top_ty:ty = $top_default:expr, $top_parse:ident; )*
        }
        anywhere {
            $( $(#[$doc:meta])* $name:ident: $ty:ty = $default:expr, $how:ident $parse:ident, $merge:ident $(($layer:ty))?; )*
        }
    ) => {
        /// Keys read by `parse_listener_config` only, refused in blocks and overrides.
        pub const TOP_LEVEL_ONLY: &[&str] = &[$(stringify!($top)),*];
        /// Keys allowed at every level.
        pub const ANYWHERE: &[&str] = &[$(stringify!($name),)* "peer", "via"];

        /// What `start_esmtp_listener` was given.
        #[derive(Clone, Debug)]
        pub struct ListenerConfig {
            $( $(#[$top_doc])* pub $top: $top_ty, )*
            pub params: GenericParams,
        }

        impl ListenerConfig {
            fn parse(table: &Map<String, Value>, errors: &mut Errors) -> Self {
                Self {
                    $( $top: table
                        .get(stringify!($top))
                        .and_then(|value| errors.take(stringify!($top), $top_parse(value)))
                        .unwrap_or_else(|| $top_default), )*
                    params: parse_table(table, "", Level::Top, errors),
                }
            }
        }

        /// Parameters as given at one level (top level, a block, a dynamic
        /// result): each field is set only where it was given.
        #[derive(Clone, Debug, Default)]
        pub struct GenericParams {
            $( $(#[$doc])* pub $name: param_kind!(@layer $merge $ty $(, $layer)?), )*
            /// Client CIDR → parameters applied after this level's own.
            pub peer: CidrMap<GenericParams>,
            /// Our address's CIDR → parameters applied after `peer`'s.
            pub via: CidrMap<GenericParams>,
        }

        /// The effective parameters of one connection.
        #[derive(Clone, Debug)]
        pub struct Params {
            $( $(#[$doc])* pub $name: param_kind!(@effective $merge $ty), )*
        }

        impl Default for Params {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        impl Params {
            /// Merge the values one level sets (not its blocks).
            fn apply_fields(&mut self, layer: &GenericParams) {
                $( param_kind!(@merge $merge, self.$name, layer.$name); )*
            }
        }

        impl GenericParams {
            /// Parse `value` into the field named `key`; `false` when `key`
            /// is no row of the table.
            fn parse_field(&mut self, key: &str, value: &Value, here: &str, errors: &mut Errors) -> bool {
                match key {
                    $( stringify!($name) => {
                        self.$name = param_kind!(@store $merge, param_kind!(@parse $how $parse, value, here, errors))
                    } )*
                    _ => return false,
                }
                true
            }
        }
    };
}

/// What each column of a row means.
///
/// `how` the parser is called:
/// - `value`: `fn(&Value) -> Result<T, String>`, its error under the key;
/// - `tree`: `fn(&Value, path, &mut Errors) -> Option<T>`, for values that
///   report errors under paths of their own (`relay_hosts[1]`, `trace_headers.header_name`).
///
/// `merge`, a level's field → the effective field:
/// - `set`: `Option<T>` → `T`, replaced when given (cloned only then);
/// - `option`: `Option<T>` → `Option<T>`, replaced when given (the `tls_*` sources);
/// - `keys`: a map → a map, merged key by key (`meta`);
/// - `fields(L)`: `Option<L>` → `T`, merged by `T::apply(&L)` (`trace_headers`);
/// - `shared(L)`: the same for a `T` that is an `Arc`, copied only when a
///   level changes it (`forward_options`: the session keeps it small).
macro_rules! param_kind {
    (@layer set $ty:ty) => { Option<$ty> };
    (@layer option $ty:ty) => { Option<$ty> };
    (@layer keys $ty:ty) => { $ty };
    (@layer fields $ty:ty, $layer:ty) => { Option<$layer> };
    (@layer shared $ty:ty, $layer:ty) => { Option<$layer> };

    (@effective set $ty:ty) => { $ty };
    (@effective option $ty:ty) => { Option<$ty> };
    (@effective keys $ty:ty) => { $ty };
    (@effective fields $ty:ty) => { $ty };
    (@effective shared $ty:ty) => { $ty };

    (@merge set, $to:expr, $from:expr) => {
        if let Some(value) = &$from {
            $to.clone_from(value);
        }
    };
    (@merge option, $to:expr, $from:expr) => {
        if $from.is_some() {
            $to.clone_from(&$from);
        }
    };
    (@merge keys, $to:expr, $from:expr) => {
        for (key, value) in &$from {
            $to.insert(key.clone(), value.clone());
        }
    };
    (@merge fields, $to:expr, $from:expr) => {
        if let Some(layer) = &$from {
            $to.apply(layer);
        }
    };
    (@merge shared, $to:expr, $from:expr) => {
        if let Some(layer) = &$from {
            std::sync::Arc::make_mut(&mut $to).apply(layer);
        }
    };

    (@store keys, $parsed:expr) => { $parsed.unwrap_or_default() };
    (@store $merge:ident, $parsed:expr) => { $parsed };

    (@parse value $parse:ident, $value:ident, $here:ident, $errors:ident) => { $errors.take($here, $parse($value)) };
    (@parse tree $parse:ident, $value:ident, $here:ident, $errors:ident) => { $parse($value, $here, $errors) };
}

/// Declares a table parameter merged field by field (like `trace_headers`):
/// the effective struct with its defaults, the layer of optional fields one
/// level gives, the merge, and the parser with every error under its key.
/// A row is `field: Type = default, parser;` with `parser` a
/// `fn(&Value) -> Result<Type, String>`.
macro_rules! field_table {
    (
        $(#[$doc:meta])* $name:ident, $layer:ident, $parse:ident, $example:literal {
            $( $(#[$field_doc:meta])* $field:ident: $ty:ty = $default:expr, $parser:ident; )*
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq)]
        pub struct $name {
            $( $(#[$field_doc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        #[doc = concat!("One level's [`", stringify!($name), "`]: each field given replaces ours.")]
        #[derive(Clone, Debug, Default)]
        pub struct $layer {
            $( $field: Option<$ty>, )*
        }

        impl $name {
            pub const FIELDS: &[&str] = &[$(stringify!($field)),*];

            pub(super) fn apply(&mut self, layer: &$layer) {
                $( param_kind!(@merge set, self.$field, layer.$field); )*
            }
        }

        pub(super) fn $parse(value: &Value, path: &str, errors: &mut Errors) -> Option<$layer> {
            let Some(table) = value.as_object() else {
                errors.push(path, expected(concat!("a table like ", $example), value));
                return None;
            };
            let mut layer = $layer::default();
            for (key, item) in table {
                let here = key_path(path, key);
                match key.as_str() {
                    $( stringify!($field) => layer.$field = errors.take(&here, $parser(item)), )*
                    unknown => errors.push(&here, unknown_key(unknown, $name::FIELDS)),
                }
            }
            Some(layer)
        }
    };
}
