using System;
using System.Globalization;

namespace OffloadRpc.Analyzers;

/// <summary>
/// OFFRPC2001-2004: transfer advice where the size of a payload is known before anything runs —
/// from <c>ExpectedBytes</c> on [Transfer], or at a call site from an array of constant length
/// (<see cref="KnownPayloadSize"/>) — and for <c>byte[]</c> service parameters that force a copy.
/// Thresholds come from .editorconfig: <c>offloadrpc.offload_threshold_bytes</c> (default: the
/// runtime's offload crossover, 4 MiB) and <c>offloadrpc.llc_bytes</c> (default: the runtime's
/// assumed last-level cache, 32 MiB).
/// </summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class TransferAdviceAnalyzer : OffloadRpcAnalyzer
{
    /// <summary>The size from which Copy is advised against and below which Offload/Pipelined/Bypass are: where the runtime's Auto stops copying on the caller.</summary>
    public const long DefaultOffloadThreshold = TransferThresholds.OffloadCrossoverBytes;

    /// <summary>The last-level-cache budget above which Inject is advised against: the runtime's assumption when the machine reports none.</summary>
    public const long DefaultLastLevelCache = TransferThresholds.DefaultLastLevelCacheBytes;

    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; } = ImmutableArray.Create(
        Diagnostics.LargeCopyRule,
        Diagnostics.InjectAboveCacheRule,
        Diagnostics.OffloadSmallRule,
        Diagnostics.ByteArrayParameterRule);

    private protected override void OnCompilationStart(CompilationStartAnalysisContext context, OffloadRpcTypes types)
    {
        context.RegisterSymbolAction(c => AnalyzeMethod(c, types.ServiceAttribute, types.TransferAttribute), SymbolKind.Method);
        context.RegisterOperationAction(c => AnalyzeCall(c, types.ServiceAttribute, types.TransferAttribute), OperationKind.Invocation);
    }

    /// <summary>Declaration site: byte[] parameters, and [Transfer] choices that contradict their own ExpectedBytes.</summary>
    private static void AnalyzeMethod(SymbolAnalysisContext context, INamedTypeSymbol service, INamedTypeSymbol transfer)
    {
        var method = (IMethodSymbol)context.Symbol;
        if (!ServiceSymbols.IsServiceMethod(method, service))
        {
            return;
        }

        (long threshold, long cache) = Thresholds(context.Options, method.Locations[0].SourceTree);
        foreach (IParameterSymbol parameter in method.Parameters)
        {
            if (parameter.Type is IArrayTypeSymbol { ElementType.SpecialType: SpecialType.System_Byte })
            {
                context.ReportDiagnostic(Diagnostic.Create(Diagnostics.ByteArrayParameterRule, parameter.Locations[0], Diagnostics.ByteArrayParameterMessage(parameter.Name)));
            }

            if (IsBuffer(parameter.Type) && TransferAttributeReader.ReadDeciding(parameter, transfer) is { ExpectedBytes: > 0 } declared)
            {
                Advise(declared, declared.ExpectedBytes, threshold, cache, parameter.Locations[0], parameter.Name, context.ReportDiagnostic);
            }
        }
    }

    /// <summary>Call site: a buffer whose size is a constant, passed to a parameter whose mode does not suit it.</summary>
    private static void AnalyzeCall(OperationAnalysisContext context, INamedTypeSymbol service, INamedTypeSymbol transfer)
    {
        var invocation = (IInvocationOperation)context.Operation;
        if (!ServiceSymbols.IsServiceMethod(invocation.TargetMethod, service))
        {
            return;
        }

        (long threshold, long cache) = Thresholds(context.Options, invocation.Syntax.SyntaxTree);
        foreach (IArgumentOperation argument in invocation.Arguments)
        {
            if (argument.Parameter is { } bufferParameter && IsBuffer(bufferParameter.Type) && ServiceSymbols.Unwrap(argument.Value) is IInvocationOperation { TargetMethod.Name: "ToArray", Arguments.Length: 0 or 1 } copy
                && (copy.Instance is not null || copy.Arguments.Length == 1))
            {
                context.ReportDiagnostic(Diagnostic.Create(Diagnostics.ByteArrayParameterRule, argument.Syntax.GetLocation(), Diagnostics.FreshCopyMessage(bufferParameter.Name)));
            }

            if (argument.Parameter is not { } parameter || !IsBuffer(parameter.Type) || KnownPayloadSize.Of(argument.Value) is not { } size)
            {
                continue;
            }

            TransferChoice declared = TransferAttributeReader.ReadDeciding(parameter, transfer) ?? default;
            Advise(declared, size, threshold, cache, argument.Syntax.GetLocation(), parameter.Name, context.ReportDiagnostic);
        }
    }

    private static void Advise(TransferChoice choice, long size, long threshold, long cache, Location location, string name, Action<Diagnostic> report)
    {
        string bytes = size.ToString("N0", CultureInfo.InvariantCulture);
        if (size >= threshold && choice.Mode == TransferMode.Copy)
        {
            report(Diagnostic.Create(Diagnostics.LargeCopyRule, location, name, bytes));
        }

        if (size > cache && choice.Cache == CachePolicy.Inject)
        {
            report(Diagnostic.Create(Diagnostics.InjectAboveCacheRule, location, name, bytes));
        }

        if (size < threshold && (choice.Cache == CachePolicy.Bypass || choice.Mode is TransferMode.Offload or TransferMode.Pipelined))
        {
            report(Diagnostic.Create(Diagnostics.OffloadSmallRule, location, name, bytes));
        }
    }

    private static bool IsBuffer(ITypeSymbol type) =>
        type is IArrayTypeSymbol { ElementType.IsUnmanagedType: true }
        || (type is INamedTypeSymbol { IsGenericType: true } named && named.ContainingNamespace?.ToDisplayString() == "System" && named.Name is "ReadOnlyMemory" or "Memory");

    private static (long Threshold, long Cache) Thresholds(AnalyzerOptions options, SyntaxTree? tree)
    {
        long threshold = DefaultOffloadThreshold;
        long cache = DefaultLastLevelCache;
        if (tree is not null)
        {
            var config = options.AnalyzerConfigOptionsProvider.GetOptions(tree);
            if (config.TryGetValue("offloadrpc.offload_threshold_bytes", out string? t) && long.TryParse(t, NumberStyles.Integer, CultureInfo.InvariantCulture, out long parsedThreshold) && parsedThreshold > 0)
            {
                threshold = parsedThreshold;
            }

            if (config.TryGetValue("offloadrpc.llc_bytes", out string? c) && long.TryParse(c, NumberStyles.Integer, CultureInfo.InvariantCulture, out long parsedCache) && parsedCache > 0)
            {
                cache = parsedCache;
            }
        }

        return (threshold, cache);
    }
}
