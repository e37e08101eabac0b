//! API-key authentication is shared by every gRPC node; it lives in `tollgate-serve`.

pub use tollgate_serve::auth::*;
