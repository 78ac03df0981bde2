//! The service as the expansion sees it. Building it rejects every method shape that cannot travel on a queue.

use proc_macro2::{Ident, Span};
use syn::{Attribute, FnArg, Pat, ReturnType, TraitItem, Type, Visibility};

use crate::errors::Errors;
use crate::parse::{self, ServiceArgs};

pub(crate) struct Service {
    pub(crate) vis: Visibility,
    pub(crate) ident: Ident,
    /// The name on the wire: the queue and topic the service is reached at.
    pub(crate) name: String,
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) supertraits: Vec<syn::TypeParamBound>,
    pub(crate) methods: Vec<Method>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Request and reply.
    Call,
    /// Fire-and-forget to the service queue.
    Oneway,
    /// Fire-and-forget to every subscriber group.
    Broadcast,
}

pub(crate) struct Method {
    pub(crate) ident: Ident,
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) kind: Kind,
    /// Where `#[rpc(...)]` chose the kind, for diagnostics.
    pub(crate) kind_span: Option<Span>,
    pub(crate) args: Vec<Arg>,
    pub(crate) output: Output,
    pub(crate) default_body: Option<syn::Block>,
}

pub(crate) struct Arg {
    pub(crate) ident: Ident,
    pub(crate) mutable: bool,
    pub(crate) ty: Type,
}

pub(crate) enum Output {
    /// `-> ()` or no return type.
    Unit,
    /// `-> T`: the reply body is `T`.
    Value(Type),
    /// `-> Result<T, E>`: `T` in an ok reply, `E` in an application-error reply.
    Result { declared: Box<Type>, ok: Box<Type>, err: Box<Type> },
}

impl Output {
    pub(crate) fn declared(&self) -> proc_macro2::TokenStream {
        match self {
            Output::Unit => quote::quote!(()),
            Output::Value(ty) => quote::quote!(#ty),
            Output::Result { declared, .. } => quote::quote!(#declared),
        }
    }
}

impl Service {
    pub(crate) fn from_trait(item: &syn::ItemTrait, args: ServiceArgs, errors: &mut Errors) -> Service {
        if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
            errors.spanned(&item.generics, "a service trait cannot be generic: its types must be known on the wire");
        }
        if let Some(unsafety) = &item.unsafety {
            errors.spanned(unsafety, "a service trait cannot be `unsafe`");
        }
        if let Some(auto) = &item.auto_token {
            errors.spanned(auto, "a service trait cannot be an auto trait");
        }
        let mut methods = Vec::new();
        for trait_item in &item.items {
            match trait_item {
                TraitItem::Fn(method) => {
                    if let Some(method) = Method::from_item(method, errors) {
                        methods.push(method);
                    }
                }
                other => errors.spanned(other, "a service trait holds only `async fn` methods"),
            }
        }
        Service {
            vis: item.vis.clone(),
            ident: item.ident.clone(),
            name: args.name.map_or_else(|| item.ident.to_string(), |name| name.value()),
            attrs: item.attrs.clone(),
            supertraits: item.supertraits.iter().cloned().collect(),
            methods,
        }
    }
}

impl Method {
    fn from_item(item: &syn::TraitItemFn, errors: &mut Errors) -> Option<Method> {
        let sig = &item.sig;
        let before = errors.len();
        let (rpc, attrs) = parse::method_attrs(&item.attrs, errors);

        if sig.asyncness.is_none() {
            errors.spanned(sig.fn_token, "service methods must be `async fn`");
        }
        if let Some(constness) = &sig.constness {
            errors.spanned(constness, "service methods cannot be `const`");
        }
        if let Some(unsafety) = &sig.unsafety {
            errors.spanned(unsafety, "service methods cannot be `unsafe`");
        }
        if let Some(abi) = &sig.abi {
            errors.spanned(abi, "service methods cannot name an ABI");
        }
        if let Some(variadic) = &sig.variadic {
            errors.spanned(variadic, "service methods cannot be variadic");
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            errors.spanned(
                &sig.generics,
                "service methods cannot be generic: every argument type must be known on the wire",
            );
        }

        let mut inputs = sig.inputs.iter();
        match inputs.next() {
            Some(FnArg::Receiver(receiver)) => {
                // A typed receiver (`self: &Self`, `self: Arc<Self>`) has no shorthand reference: checked first.
                if receiver.colon_token.is_some() {
                    errors.spanned(receiver, "service methods take a plain `&self`, not a typed receiver");
                } else if receiver.reference.is_none() {
                    errors.spanned(
                        receiver,
                        "service methods take `&self`, not `self` by value: one service value serves every call",
                    );
                } else if receiver.mutability.is_some() {
                    errors.spanned(receiver, "service methods take `&self`, not `&mut self`: calls run concurrently; use interior mutability");
                } else if let Some((_, Some(lifetime))) = &receiver.reference {
                    errors.spanned(lifetime, "service methods take `&self` without a lifetime");
                }
            }
            Some(other) => errors.spanned(other, "service methods take `&self` first"),
            None => errors.spanned(&sig.ident, "service methods take `&self` first"),
        }

        let mut args = Vec::new();
        for input in inputs {
            let FnArg::Typed(typed) = input else {
                errors.spanned(input, "`self` can only come first");
                continue;
            };
            let (ident, mutable) = match &*typed.pat {
                Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => {
                    (pat.ident.clone(), pat.mutability.is_some())
                }
                other => {
                    errors.spanned(
                        other,
                        "service arguments must be plain names (`x: T`): the name is the argument's key on the wire",
                    );
                    continue;
                }
            };
            if let Some(bad) = unsendable_type(&typed.ty) {
                errors.spanned(bad, "service arguments must be owned types that travel on a queue: no references or `impl Trait` (take `String` for `&str`, `Vec<T>` for `&[T]`)");
                continue;
            }
            args.push(Arg { ident, mutable, ty: (*typed.ty).clone() });
        }

        let output = match &sig.output {
            ReturnType::Default => Output::Unit,
            ReturnType::Type(_, ty) => {
                if let Some(bad) = unsendable_type(ty) {
                    errors.spanned(bad, "service methods must return an owned type: no references or `impl Trait`");
                }
                output_of(ty)
            }
        };

        let kind = match (rpc.oneway, rpc.broadcast) {
            (Some(_), Some(span)) => {
                errors
                    .push(syn::Error::new(span, "`broadcast` is already oneway; use one of `oneway` and `broadcast`"));
                Kind::Broadcast
            }
            (Some(_), None) => Kind::Oneway,
            (None, Some(_)) => Kind::Broadcast,
            (None, None) => Kind::Call,
        };
        let kind_span = rpc.broadcast.or(rpc.oneway);

        (errors.len() == before).then(|| Method {
            ident: sig.ident.clone(),
            attrs,
            kind,
            kind_span,
            args,
            output,
            default_body: item.default.clone(),
        })
    }
}

/// `Result<T, E>` (any path ending in `Result` with two type arguments) travels as ok or application error.
fn output_of(ty: &Type) -> Output {
    if let Type::Tuple(tuple) = ty
        && tuple.elems.is_empty()
    {
        return Output::Unit;
    }
    if let Type::Path(path) = ty
        && path.qself.is_none()
        && let Some(last) = path.path.segments.last()
        && last.ident == "Result"
        && let syn::PathArguments::AngleBracketed(generics) = &last.arguments
        && let [syn::GenericArgument::Type(ok), syn::GenericArgument::Type(err)] =
            generics.args.iter().collect::<Vec<_>>().as_slice()
    {
        return Output::Result { declared: Box::new(ty.clone()), ok: Box::new(ok.clone()), err: Box::new(err.clone()) };
    }
    Output::Value(ty.clone())
}

/// The first part of `ty` that cannot be sent as an owned value.
fn unsendable_type(ty: &Type) -> Option<&Type> {
    match ty {
        Type::Reference(_) | Type::ImplTrait(_) | Type::TraitObject(_) | Type::BareFn(_) | Type::Infer(_) => Some(ty),
        Type::Array(array) => unsendable_type(&array.elem),
        Type::Slice(slice) => unsendable_type(&slice.elem),
        Type::Paren(paren) => unsendable_type(&paren.elem),
        Type::Group(group) => unsendable_type(&group.elem),
        Type::Ptr(_) => Some(ty),
        Type::Tuple(tuple) => tuple.elems.iter().find_map(unsendable_type),
        Type::Path(path) => path.path.segments.iter().find_map(|segment| match &segment.arguments {
            syn::PathArguments::AngleBracketed(generics) => generics.args.iter().find_map(|arg| match arg {
                syn::GenericArgument::Type(ty) => unsendable_type(ty),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    }
}
