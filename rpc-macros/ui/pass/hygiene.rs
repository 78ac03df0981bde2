//! Generated code uses absolute paths only: it compiles without the prelude and next to items that shadow
//! every prelude name it could have used.
#![no_implicit_prelude]

#[allow(dead_code)]
mod shadows {
    pub struct Result;
    pub struct Option;
    pub struct Box;
    pub struct Vec;
    pub struct String;
    pub struct Arc;
    pub struct Bytes;
    pub trait Send {}
    pub trait Sync {}
    pub trait Future {}
    pub trait Clone {}
    pub mod serde {}
    pub mod core {}
    pub mod std {}
}

#[allow(unused_imports)]
use shadows::*;

/// A service defined where the prelude is gone.
#[::rpc_core::service]
pub trait Hygienic {
    /// A call with a typed error.
    async fn get(&self, key: ::std::string::String) -> ::std::result::Result<u64, ::std::string::String>;
    /// Fire-and-forget.
    #[rpc(oneway)]
    async fn put(&self, key: ::std::string::String, value: u64);
}

struct Impl;

impl Hygienic for Impl {
    async fn get(&self, key: ::std::string::String) -> ::std::result::Result<u64, ::std::string::String> {
        ::std::result::Result::Err(key)
    }

    async fn put(&self, _key: ::std::string::String, _value: u64) {}
}

fn main() {
    let _server = HygienicServer::new(Impl);
    let _descriptor = HygienicClient::GET;
}
