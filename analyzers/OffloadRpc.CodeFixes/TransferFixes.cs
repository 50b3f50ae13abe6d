using System;
using System.Collections.Immutable;
using System.Composition;
using System.Linq;
using System.Threading;
using System.Threading.Tasks;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CodeActions;
using Microsoft.CodeAnalysis.CodeFixes;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.CSharp.Syntax;
using Microsoft.CodeAnalysis.Operations;
using Microsoft.CodeAnalysis.Simplification;
using OffloadRpc.Analyzers;
using OffloadRpc.Generators;

namespace OffloadRpc.CodeFixes;

/// <summary>What every OffloadRpc fix does the same way: Fix All in batches, one registration per diagnostic with the document's root and semantic model.</summary>
public abstract class OffloadRpcFix : CodeFixProvider
{
    private protected OffloadRpcFix()
    {
    }

    public sealed override FixAllProvider GetFixAllProvider() => WellKnownFixAllProviders.BatchFixer;

    public sealed override async Task RegisterCodeFixesAsync(CodeFixContext context)
    {
        SyntaxNode? root = await context.Document.GetSyntaxRootAsync(context.CancellationToken).ConfigureAwait(false);
        SemanticModel? model = await context.Document.GetSemanticModelAsync(context.CancellationToken).ConfigureAwait(false);
        if (root is null || model is null)
        {
            return;
        }

        foreach (Diagnostic diagnostic in context.Diagnostics)
        {
            Register(context, root, model, diagnostic);
        }
    }

    /// <summary>Registers the fix for <paramref name="diagnostic"/>, if it has one here.</summary>
    private protected abstract void Register(CodeFixContext context, SyntaxNode root, SemanticModel model, Diagnostic diagnostic);

    /// <summary>Offers a fix that gives this document a new root; <paramref name="rewrite"/> runs only when the fix is applied.</summary>
    private protected static void Offer(CodeFixContext context, Diagnostic diagnostic, string title, string equivalenceKey, Func<SyntaxNode> rewrite) =>
        context.RegisterCodeFix(
            CodeAction.Create(title, _ => Task.FromResult(context.Document.WithSyntaxRoot(rewrite())), equivalenceKey: equivalenceKey),
            diagnostic);
}

/// <summary>
/// Fixes OFFRPC2001-2003 by rewriting the [Transfer] attribute that decided the mode: on the
/// parameter, else on the method (found through the call for a call-site diagnostic).
/// </summary>
[ExportCodeFixProvider(LanguageNames.CSharp, Name = nameof(TransferModeFix)), Shared]
public sealed class TransferModeFix : OffloadRpcFix
{
    public override ImmutableArray<string> FixableDiagnosticIds { get; } =
        ImmutableArray.Create(Diagnostics.LargeCopy, Diagnostics.InjectAboveCache, Diagnostics.OffloadSmall);

    private protected override void Register(CodeFixContext context, SyntaxNode root, SemanticModel model, Diagnostic diagnostic)
    {
        SyntaxNode node = root.FindNode(diagnostic.Location.SourceSpan, getInnermostNodeForTie: true);
        IParameterSymbol? parameter = node.FirstAncestorOrSelf<ParameterSyntax>() is { } declared
            ? model.GetDeclaredSymbol(declared, context.CancellationToken)
            : (model.GetOperation(node, context.CancellationToken)?.Parent as IArgumentOperation)?.Parameter
              ?? (model.GetOperation(node.FirstAncestorOrSelf<ArgumentSyntax>() ?? node, context.CancellationToken) as IArgumentOperation)?.Parameter;
        if (parameter is null || FindAttribute(parameter, model.Compilation, context.CancellationToken) is not { } attribute)
        {
            return;
        }

        (string? mode, string? cache, string title) = diagnostic.Id switch
        {
            Diagnostics.LargeCopy => ((string?)nameof(TransferMode.Pipelined), (string?)null, "Transfer in Pipelined mode"),
            Diagnostics.InjectAboveCache => (null, nameof(CachePolicy.Bypass), "Bypass the cache"),
            _ => (nameof(TransferMode.Copy), nameof(CachePolicy.Inject), "Copy inline into the cache"),
        };

        Document target = context.Document.Project.Solution.GetDocument(attribute.SyntaxTree) ?? context.Document;
        context.RegisterCodeFix(
            CodeAction.Create(title, ct => RewriteAsync(target, attribute, mode, cache, ct), equivalenceKey: diagnostic.Id),
            diagnostic);
    }

    /// <summary>The [Transfer] syntax that decides the parameter's mode: its own, else its method's.</summary>
    private static AttributeSyntax? FindAttribute(IParameterSymbol parameter, Compilation compilation, CancellationToken cancellationToken) =>
        TransferAttributeReader.FindDeciding(parameter, compilation.GetTypeByMetadataName(TransferAttributeReader.AttributeMetadataName))
            ?.ApplicationSyntaxReference?.GetSyntax(cancellationToken) as AttributeSyntax;

    private static async Task<Document> RewriteAsync(Document document, AttributeSyntax attribute, string? mode, string? cache, CancellationToken cancellationToken)
    {
        SyntaxNode? root = await document.GetSyntaxRootAsync(cancellationToken).ConfigureAwait(false);
        if (root is null)
        {
            return document;
        }

        AttributeArgumentListSyntax arguments = attribute.ArgumentList ?? SyntaxFactory.AttributeArgumentList();
        var positional = arguments.Arguments.Where(a => a.NameEquals is null).ToList();
        var named = arguments.Arguments.Where(a => a.NameEquals is not null).ToList();
        ExpressionSyntax modeExpression = positional.Count > 0 ? positional[0].Expression : Member(nameof(TransferMode), nameof(TransferMode.Auto));
        ExpressionSyntax cacheExpression = positional.Count > 1 ? positional[1].Expression : Member(nameof(CachePolicy), nameof(CachePolicy.Auto));
        if (mode is not null)
        {
            modeExpression = Member(nameof(TransferMode), mode);
        }

        if (cache is not null)
        {
            cacheExpression = Member(nameof(CachePolicy), cache);
        }

        var rewritten = SyntaxFactory.SeparatedList(
            new[] { SyntaxFactory.AttributeArgument(modeExpression), SyntaxFactory.AttributeArgument(cacheExpression) }.Concat(named));
        AttributeSyntax replacement = attribute.WithArgumentList(arguments.WithArguments(rewritten));
        return document.WithSyntaxRoot(root.ReplaceNode(attribute, replacement));
    }

    private static ExpressionSyntax Member(string type, string member) =>
        SyntaxFactory.ParseExpression($"global::OffloadRpc.{type}.{member}").WithAdditionalAnnotations(Simplifier.Annotation);
}

/// <summary>Fixes OFFRPC2004: a byte[] service parameter becomes ReadOnlyMemory&lt;byte&gt; (read in place in shared memory on the server).</summary>
[ExportCodeFixProvider(LanguageNames.CSharp, Name = nameof(ByteArrayParameterFix)), Shared]
public sealed class ByteArrayParameterFix : OffloadRpcFix
{
    public override ImmutableArray<string> FixableDiagnosticIds { get; } = ImmutableArray.Create(Diagnostics.ByteArrayParameter);

    private protected override void Register(CodeFixContext context, SyntaxNode root, SemanticModel model, Diagnostic diagnostic)
    {
        SyntaxNode node = root.FindNode(diagnostic.Location.SourceSpan, getInnermostNodeForTie: true);
        if (node.FirstAncestorOrSelf<ArgumentSyntax>() is { Expression: InvocationExpressionSyntax { Expression: MemberAccessExpressionSyntax { Name.Identifier.ValueText: "ToArray" } access, ArgumentList.Arguments.Count: 0 } } argument
            && model.GetTypeInfo(access.Expression, context.CancellationToken).Type is IArrayTypeSymbol or INamedTypeSymbol { Name: "Memory" or "ReadOnlyMemory" })
        {
            // A fresh copy of an array or a Memory: pass the buffer itself (the call copies it into shared memory anyway).
            Offer(context, diagnostic, "Pass the buffer without a copy", Diagnostics.ByteArrayParameter + ".ToArray", () => root.ReplaceNode(argument.Expression, access.Expression.WithTriviaFrom(argument.Expression)));
            return;
        }

        if (node.FirstAncestorOrSelf<ParameterSyntax>() is not { Type: { } type } parameter)
        {
            return;
        }

        Offer(context, diagnostic, "Take ReadOnlyMemory<byte>", Diagnostics.ByteArrayParameter, () =>
        {
            TypeSyntax memory = SyntaxFactory.ParseTypeName("global::System.ReadOnlyMemory<byte>").WithTriviaFrom(type).WithAdditionalAnnotations(Simplifier.Annotation);
            return root.ReplaceNode(parameter, parameter.WithType(memory));
        });
    }
}

/// <summary>Fixes OFFRPC2006 where the use is a Dispose call: the lease moved with the call, so the call is removed.</summary>
[ExportCodeFixProvider(LanguageNames.CSharp, Name = nameof(MovedBufferDisposeFix)), Shared]
public sealed class MovedBufferDisposeFix : OffloadRpcFix
{
    public override ImmutableArray<string> FixableDiagnosticIds { get; } = ImmutableArray.Create(Diagnostics.UsedAfterMove);

    private protected override void Register(CodeFixContext context, SyntaxNode root, SemanticModel model, Diagnostic diagnostic)
    {
        SyntaxNode node = root.FindNode(diagnostic.Location.SourceSpan, getInnermostNodeForTie: true);
        if (node.Parent is MemberAccessExpressionSyntax { Name.Identifier.ValueText: "Dispose" } access
            && access.Parent is InvocationExpressionSyntax { ArgumentList.Arguments.Count: 0 } call
            && call.Parent is ExpressionStatementSyntax statement)
        {
            Offer(context, diagnostic, "Remove the Dispose of a lease that moved", Diagnostics.UsedAfterMove, () => root.RemoveNode(statement, SyntaxRemoveOptions.KeepNoTrivia)!);
        }
    }
}

/// <summary>Fixes OFFRPC2005 by giving the call a copy of the buffer, so later writes cannot reach the bytes in flight.</summary>
[ExportCodeFixProvider(LanguageNames.CSharp, Name = nameof(BufferInFlightFix)), Shared]
public sealed class BufferInFlightFix : OffloadRpcFix
{
    public override ImmutableArray<string> FixableDiagnosticIds { get; } = ImmutableArray.Create(Diagnostics.WrittenInFlight);

    private protected override void Register(CodeFixContext context, SyntaxNode root, SemanticModel model, Diagnostic diagnostic)
    {
        if (diagnostic.AdditionalLocations.Count == 0
            || root.FindNode(diagnostic.AdditionalLocations[0].SourceSpan, getInnermostNodeForTie: true).FirstAncestorOrSelf<ArgumentSyntax>() is not { } argument
            || model.GetTypeInfo(argument.Expression, context.CancellationToken).Type is not { } type)
        {
            return;
        }

        string source = argument.Expression is IdentifierNameSyntax or MemberAccessExpressionSyntax ? argument.Expression.ToString() : $"({argument.Expression})";
        ExpressionSyntax copy = type is IArrayTypeSymbol
            ? SyntaxFactory.ParseExpression($"({type.ToMinimalDisplayString(model, argument.SpanStart)}){source}.Clone()")
            : SyntaxFactory.ParseExpression($"{source}.ToArray()");
        copy = copy.WithAdditionalAnnotations(Simplifier.Annotation);
        Offer(context, diagnostic, "Pass a copy of the buffer", Diagnostics.WrittenInFlight, () => root.ReplaceNode(argument.Expression, copy));
    }
}
