using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Operations;

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
