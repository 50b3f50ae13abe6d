namespace OffloadRpc.Analyzers;

/// <summary>What every OffloadRpc analyzer asks of symbols and operations.</summary>
internal static class ServiceSymbols
{
    public static bool HasAttribute(ISymbol symbol, INamedTypeSymbol attribute)
    {
        foreach (AttributeData data in symbol.GetAttributes())
        {
            if (SymbolEqualityComparer.Default.Equals(data.AttributeClass, attribute))
            {
                return true;
            }
        }

        return false;
    }

    /// <summary>A method declared on an [OffloadService] interface.</summary>
    public static bool IsServiceMethod(IMethodSymbol method, INamedTypeSymbol service) =>
        method.ContainingType is { TypeKind: TypeKind.Interface } type && HasAttribute(type, service);

    /// <summary>The operation under any implicit or explicit conversions.</summary>
    public static IOperation Unwrap(IOperation value)
    {
        while (value is IConversionOperation conversion)
        {
            value = conversion.Operand;
        }

        return value;
    }
}

/// <summary>The OffloadRpc types the analyzers look for, resolved once per compilation.</summary>
internal sealed record OffloadRpcTypes(INamedTypeSymbol ServiceAttribute, INamedTypeSymbol TransferAttribute, INamedTypeSymbol SharedBuffer)
{
    /// <summary>The types, or null when the compilation does not reference OffloadRpc.</summary>
    public static OffloadRpcTypes? Resolve(Compilation compilation) =>
        compilation.GetTypeByMetadataName(ServiceParser.OffloadServiceAttribute) is { } service
        && compilation.GetTypeByMetadataName(TransferAttributeReader.AttributeMetadataName) is { } transfer
        && compilation.GetTypeByMetadataName("OffloadRpc.SharedBuffer") is { } sharedBuffer
            ? new OffloadRpcTypes(service, transfer, sharedBuffer)
            : null;
}

/// <summary>
/// What every OffloadRpc analyzer does the same way: concurrent, not on generated code, and only in
/// compilations that reference OffloadRpc, with its types resolved once.
/// </summary>
public abstract class OffloadRpcAnalyzer : DiagnosticAnalyzer
{
    private protected OffloadRpcAnalyzer()
    {
    }

    public sealed override void Initialize(AnalysisContext context)
    {
        context.EnableConcurrentExecution();
        context.ConfigureGeneratedCodeAnalysis(GeneratedCodeAnalysisFlags.None);
        context.RegisterCompilationStartAction(start =>
        {
            if (OffloadRpcTypes.Resolve(start.Compilation) is { } types)
            {
                OnCompilationStart(start, types);
            }
        });
    }

    private protected abstract void OnCompilationStart(CompilationStartAnalysisContext context, OffloadRpcTypes types);
}
