using System.Collections.Generic;
using Microsoft.CodeAnalysis;

namespace OffloadRpc.Generators;

/// <summary>What one [Transfer] says: the mode, the cache policy and the expected payload size (0 when not given).</summary>
internal readonly record struct TransferChoice(TransferMode Mode, CachePolicy Cache, long ExpectedBytes)
{
    /// <summary>Both Auto: the runtime decides.</summary>
    public bool IsAuto => Mode == TransferMode.Auto && Cache == CachePolicy.Auto;
}

/// <summary>
/// Reads [Transfer(mode, cache, ExpectedBytes = n)]: the one place that knows how the attribute is
/// laid out, shared by the generator's parser, the analyzers and the code fixes.
/// </summary>
internal static class TransferAttributeReader
{
    public const string AttributeMetadataName = "OffloadRpc.TransferAttribute";

    private const string ExpectedBytesProperty = "ExpectedBytes";

    /// <summary>The [Transfer] applied to <paramref name="symbol"/>, or null.</summary>
    public static AttributeData? Find(ISymbol symbol, INamedTypeSymbol? transferAttribute)
    {
        if (transferAttribute is null)
        {
            return null;
        }

        foreach (AttributeData attribute in symbol.GetAttributes())
        {
            if (SymbolEqualityComparer.Default.Equals(attribute.AttributeClass, transferAttribute))
            {
                return attribute;
            }
        }

        return null;
    }

    /// <summary>The [Transfer] that decides how a buffer parameter moves: its own, else its method's.</summary>
    public static AttributeData? FindDeciding(IParameterSymbol parameter, INamedTypeSymbol? transferAttribute) =>
        Find(parameter, transferAttribute) ?? (parameter.ContainingSymbol is { } method ? Find(method, transferAttribute) : null);

    public static TransferChoice Read(AttributeData attribute)
    {
        TransferMode mode = Argument(attribute, 0) is int m ? (TransferMode)m : TransferMode.Auto;
        CachePolicy cache = Argument(attribute, 1) is int c ? (CachePolicy)c : CachePolicy.Auto;
        long expected = 0;
        foreach (KeyValuePair<string, TypedConstant> named in attribute.NamedArguments)
        {
            if (named.Key == ExpectedBytesProperty && named.Value.Value is long value)
            {
                expected = value;
            }
        }

        return new TransferChoice(mode, cache, expected);
    }

    /// <summary>The choice of [Transfer] on <paramref name="symbol"/>, or null when it has none.</summary>
    public static TransferChoice? Read(ISymbol symbol, INamedTypeSymbol? transferAttribute) =>
        Find(symbol, transferAttribute) is { } attribute ? Read(attribute) : null;

    /// <summary>The choice that decides how a buffer parameter moves (its own [Transfer], else its method's), or null when neither has one.</summary>
    public static TransferChoice? ReadDeciding(IParameterSymbol parameter, INamedTypeSymbol? transferAttribute) =>
        FindDeciding(parameter, transferAttribute) is { } attribute ? Read(attribute) : null;

    /// <summary>A positional enum argument as its underlying value, or null when omitted (the parameter's default is Auto).</summary>
    private static int? Argument(AttributeData attribute, int position) =>
        attribute.ConstructorArguments.Length > position && attribute.ConstructorArguments[position].Value is int value ? value : null;
}
