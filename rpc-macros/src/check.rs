//! Rules that look across the model: generated names and what each kind of method may return.

use std::collections::HashMap;

use syn::ext::IdentExt;

use crate::errors::Errors;
use crate::model::{Kind, Output, Service};

/// Inherent items of the generated client that a method name must not take.
const CLIENT_ITEMS: &[&str] = &["new", "client"];

pub(crate) fn check(service: &Service, errors: &mut Errors) {
    let mut descriptors: HashMap<String, &syn::Ident> = HashMap::new();
    for method in &service.methods {
        let name = method.ident.unraw().to_string();
        if CLIENT_ITEMS.contains(&name.as_str()) {
            errors.spanned(
                &method.ident,
                format!(
                    "method `{name}` clashes with the generated `{}Client::{name}`; rename the method",
                    service.ident
                ),
            );
        }
        let descriptor = descriptor_name(&method.ident);
        if let Some(first) = descriptors.insert(descriptor.clone(), &method.ident) {
            errors.spanned(
                &method.ident,
                format!("methods `{first}` and `{name}` would both generate the descriptor `{descriptor}`; rename one"),
            );
        }
        if method.kind != Kind::Call && !matches!(method.output, Output::Unit) {
            let what = if method.kind == Kind::Broadcast { "broadcast" } else { "oneway" };
            let message = format!("a {what} method has no reply, so it cannot return a value; remove the return type");
            match method.kind_span {
                Some(span) => errors.push(syn::Error::new(span, message)),
                None => errors.spanned(&method.ident, message),
            }
        }
    }
}

/// `add` -> `ADD`, the associated const on the client that describes the method.
pub(crate) fn descriptor_name(ident: &syn::Ident) -> String {
    ident.unraw().to_string().to_uppercase()
}
