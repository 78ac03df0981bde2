//! Attribute arguments: `#[service(name = "...")]` and `#[rpc(oneway | broadcast)]`.

use syn::parse::Parser;
use syn::{Attribute, LitStr};

use crate::errors::Errors;

/// The arguments of `#[service(...)]`.
#[derive(Default)]
pub(crate) struct ServiceArgs {
    pub(crate) name: Option<LitStr>,
}

pub(crate) fn service_args(args: proc_macro2::TokenStream, errors: &mut Errors) -> ServiceArgs {
    let mut out = ServiceArgs::default();
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            let value: LitStr = meta.value()?.parse()?;
            if value.value().trim().is_empty() {
                return Err(syn::Error::new_spanned(&value, "the service name must not be empty"));
            }
            out.name = Some(value);
            Ok(())
        } else {
            Err(meta.error("unknown `service` argument; expected `name = \"...\"`"))
        }
    });
    if let Err(error) = parser.parse2(args) {
        errors.push(error);
    }
    out
}

/// What `#[rpc(...)]` says about one method.
#[derive(Default)]
pub(crate) struct MethodArgs {
    pub(crate) oneway: Option<proc_macro2::Span>,
    pub(crate) broadcast: Option<proc_macro2::Span>,
}

/// Splits a method's attributes into `#[rpc(...)]` (parsed) and the rest (kept, docs included).
pub(crate) fn method_attrs(attrs: &[Attribute], errors: &mut Errors) -> (MethodArgs, Vec<Attribute>) {
    let mut args = MethodArgs::default();
    let mut kept = Vec::new();
    for attr in attrs {
        if !attr.path().is_ident("rpc") {
            kept.push(attr.clone());
            continue;
        }
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("oneway") {
                args.oneway = Some(syn::spanned::Spanned::span(&meta.path));
                Ok(())
            } else if meta.path.is_ident("broadcast") {
                args.broadcast = Some(syn::spanned::Spanned::span(&meta.path));
                Ok(())
            } else {
                Err(meta.error("unknown `rpc` argument; expected `oneway` or `broadcast`"))
            }
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }
    (args, kept)
}

/// Removes `#[rpc(...)]` attributes, for emitting the user's trait as it was when the input has errors.
pub(crate) fn strip_rpc_attrs(item: &mut syn::ItemTrait) {
    for trait_item in &mut item.items {
        if let syn::TraitItem::Fn(method) = trait_item {
            method.attrs.retain(|attr| !attr.path().is_ident("rpc"));
        }
    }
}
