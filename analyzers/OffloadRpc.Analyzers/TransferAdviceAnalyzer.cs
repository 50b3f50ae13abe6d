using System;
using System.Collections.Generic;
using System.Collections.Immutable;
using System.Globalization;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Diagnostics;
using Microsoft.CodeAnalysis.Operations;
using OffloadRpc.Generators;

namespace OffloadRpc.Analyzers;

/// <summary>
/// OFFRPC2001-2004: transfer advice where the size of a payload is known before anything runs —
/// from <c>ExpectedBytes</c> on [Transfer], or at a call site from <c>new byte[N]</c> with a constant
/// N — and for <c>byte[]</c> service parameters that force a copy. Thresholds come from
/// .editorconfig: <c>offloadrpc.offload_threshold_bytes</c> (default 1 MiB) and
/// <c>offloadrpc.llc_bytes</c> (default 32 MiB).
/// </summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class TransferAdviceAnalyzer : DiagnosticAnalyzer
{
    public const long DefaultOffloadThreshold = 1 << 20;
    public const long DefaultLastLevelCache = 32L << 20;

    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; } = ImmutableArray.Create(
        Diagnostics.LargeCopyRule,
        Diagnostics.InjectAboveCacheRule,
        Diagnostics.OffloadSmallRule,
        Diagnostics.ByteArrayParameterRule);

    public override void Initialize(AnalysisContext context)
    {
        context.EnableConcurrentExecution();
        context.ConfigureGeneratedCodeAnalysis(GeneratedCodeAnalysisFlags.None);
        context.RegisterCompilationStartAction(start =>
        {
            INamedTypeSymbol? service = start.Compilation.GetTypeByMetadataName(ServiceParser.OffloadServiceAttribute);
            INamedTypeSymbol? transfer = start.Compilation.GetTypeByMetadataName("OffloadRpc.TransferAttribute");
            if (service is null || transfer is null)
            {
                return;
            }

            start.RegisterSymbolAction(c => AnalyzeMethod(c, service, transfer), SymbolKind.Method);
            start.RegisterOperationAction(c => AnalyzeCall(c, service, transfer), OperationKind.Invocation);
        });
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

            if (IsBuffer(parameter.Type) && (ReadTransfer(parameter, transfer) ?? ReadTransfer(method, transfer)) is { ExpectedBytes: > 0 } declared)
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

            if (argument.Parameter is not { } parameter || !IsBuffer(parameter.Type) || KnownSize(argument.Value) is not { } size)
            {
                continue;
            }

            TransferChoice declared = ReadTransfer(parameter, transfer) ?? ReadTransfer(invocation.TargetMethod, transfer) ?? default;
            Advise(declared, size, threshold, cache, argument.Syntax.GetLocation(), parameter.Name, context.ReportDiagnostic);
        }
    }

    private static void Advise(TransferChoice choice, long size, long threshold, long cache, Location location, string name, Action<Diagnostic> report)
    {
        string bytes = size.ToString("N0", CultureInfo.InvariantCulture);
        if (size >= threshold && choice.Mode == Copy)
        {
            report(Diagnostic.Create(Diagnostics.LargeCopyRule, location, name, bytes));
        }

        if (size > cache && choice.Cache == Inject)
        {
            report(Diagnostic.Create(Diagnostics.InjectAboveCacheRule, location, name, bytes));
        }

        if (size < threshold && (choice.Cache == Bypass || choice.Mode is Offload or Pipelined))
        {
            report(Diagnostic.Create(Diagnostics.OffloadSmallRule, location, name, bytes));
        }
    }

    // TransferMode and CachePolicy values (the runtime's enums).
    private const int Copy = 1;
    private const int Offload = 2;
    private const int Pipelined = 3;
    private const int Inject = 1;
    private const int Bypass = 2;

    private readonly record struct TransferChoice(int Mode, int Cache, long ExpectedBytes);

    private static TransferChoice? ReadTransfer(ISymbol symbol, INamedTypeSymbol transfer)
    {
        foreach (AttributeData attribute in symbol.GetAttributes())
        {
            if (!SymbolEqualityComparer.Default.Equals(attribute.AttributeClass, transfer))
            {
                continue;
            }

            int mode = attribute.ConstructorArguments.Length > 0 && attribute.ConstructorArguments[0].Value is int m ? m : 0;
            int cache = attribute.ConstructorArguments.Length > 1 && attribute.ConstructorArguments[1].Value is int c ? c : 0;
            long expected = 0;
            foreach (KeyValuePair<string, TypedConstant> named in attribute.NamedArguments)
            {
                if (named.Key == "ExpectedBytes" && named.Value.Value is long value)
                {
                    expected = value;
                }
            }

            return new TransferChoice(mode, cache, expected);
        }

        return null;
    }

    /// <summary>The byte size of a buffer argument when the code fixes it: <c>new byte[N]</c> (or of any unmanaged T) with a constant N.</summary>
    private static long? KnownSize(IOperation value)
    {
        while (value is IConversionOperation conversion)
        {
            value = conversion.Operand;
        }

        if (value is IArrayCreationOperation { DimensionSizes.Length: 1 } creation
            && creation.DimensionSizes[0].ConstantValue is { HasValue: true, Value: int length }
            && creation.Type is IArrayTypeSymbol { ElementType: { } element })
        {
            return (long)length * ElementSize(element);
        }

        return null;
    }

    private static int ElementSize(ITypeSymbol type) => type.SpecialType switch
    {
        SpecialType.System_Byte or SpecialType.System_SByte or SpecialType.System_Boolean => 1,
        SpecialType.System_Int16 or SpecialType.System_UInt16 or SpecialType.System_Char => 2,
        SpecialType.System_Int32 or SpecialType.System_UInt32 or SpecialType.System_Single => 4,
        SpecialType.System_Int64 or SpecialType.System_UInt64 or SpecialType.System_Double => 8,
        _ => 1,
    };

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
