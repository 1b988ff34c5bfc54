//! The protocol-free core: the live [`runtime::Runtime`] and its [`runtime::Snapshot`] (one
//! [`runtime::Pool`] per configured pool, the [`route::Router`]), per-backend state,
//! the strategies, the retry budget and the passive-health verdict. Nothing
//! here names hyper, sockets, the HTTP or TCP sides, the listeners, health
//! checks, the admin listener or the reloader: they all sit on top of it.

pub mod affinity;
pub mod budget;
pub mod conns;
pub mod discovered;
pub mod failure;
pub mod passive;
pub mod route;
pub mod runtime;
pub mod selection;
pub mod state;
