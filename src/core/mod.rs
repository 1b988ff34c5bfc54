//! The protocol-free core: logic that knows nothing of hyper, HTTP types,
//! sockets or the config file, so that both the config module (to parse and
//! validate) and the request path (to decide) can use it.

pub mod route;
