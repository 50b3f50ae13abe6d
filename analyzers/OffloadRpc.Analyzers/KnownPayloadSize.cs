namespace OffloadRpc.Analyzers;

/// <summary>
/// The byte size of a buffer argument when the code fixes it before anything runs: an array created
/// with a constant length (<c>new T[N]</c>, <c>GC.AllocateUninitializedArray&lt;T&gt;(N)</c>,
/// <c>GC.AllocateArray&lt;T&gt;(N)</c>), seen through implicit conversions (to Memory/ReadOnlyMemory)
/// and through locals whose only value it is. A local counts only when exactly one write gives it a
/// value (its initializer or one plain assignment) and nothing else can change it: another
/// assignment anywhere in the member (lambdas and local functions included), a deconstruction, a
/// ref or out argument, a ref alias or its address makes its size unknown.
/// </summary>
internal static class KnownPayloadSize
{
    /// <summary>How many locals a value may be followed through (<c>var a = new byte[N]; ReadOnlyMemory&lt;byte&gt; b = a;</c>).</summary>
    private const int MaxLocalHops = 4;

    /// <summary>The size in bytes of <paramref name="value"/>, or null when the code does not fix it.</summary>
    public static long? Of(IOperation value) => Of(value, MaxLocalHops);

    private static long? Of(IOperation value, int hops)
    {
        switch (ServiceSymbols.Unwrap(value))
        {
            case IArrayCreationOperation { DimensionSizes.Length: 1, Type: IArrayTypeSymbol { Rank: 1 } array } creation:
                return Bytes(creation.DimensionSizes[0], array.ElementType);
            case IInvocationOperation { TargetMethod: { Name: "AllocateUninitializedArray" or "AllocateArray", TypeArguments.Length: 1 } method } call when IsSystemGC(method.ContainingType):
                return LengthArgument(call) is { } length ? Bytes(length, method.TypeArguments[0]) : null;
            case ILocalReferenceOperation reference when hops > 0 && OnlyValue(reference) is { } assigned:
                return Of(assigned, hops - 1);
            default:
                return null;
        }
    }

    private static long? Bytes(IOperation length, ITypeSymbol element)
    {
        long? count = length.ConstantValue is { HasValue: true, Value: var constant } ? constant switch
        {
            int n => n,
            long n => n,
            _ => null,
        } : null;
        return count is >= 0 && ElementSize(element) is { } size ? count * size : null;
    }

    private static IOperation? LengthArgument(IInvocationOperation call)
    {
        foreach (IArgumentOperation argument in call.Arguments)
        {
            if (argument.Parameter?.Ordinal == 0)
            {
                return argument.Value;
            }
        }

        return null;
    }

    private static bool IsSystemGC(INamedTypeSymbol? type) =>
        type is { Name: "GC", ContainingType: null, ContainingNamespace: { Name: "System", ContainingNamespace.IsGlobalNamespace: true } };

    /// <summary>The size of one element of a primitive (or enum) type; null for any other type, whose size the analyzer does not guess.</summary>
    private static int? ElementSize(ITypeSymbol type) => (type is INamedTypeSymbol { EnumUnderlyingType: { } underlying } ? underlying : type).SpecialType switch
    {
        SpecialType.System_Byte or SpecialType.System_SByte or SpecialType.System_Boolean => 1,
        SpecialType.System_Int16 or SpecialType.System_UInt16 or SpecialType.System_Char => 2,
        SpecialType.System_Int32 or SpecialType.System_UInt32 or SpecialType.System_Single => 4,
        SpecialType.System_Int64 or SpecialType.System_UInt64 or SpecialType.System_Double => 8,
        _ => null,
    };

    /// <summary>The one value <paramref name="reference"/>'s local ever holds, or null when it has none or may have another.</summary>
    private static IOperation? OnlyValue(ILocalReferenceOperation reference)
    {
        ILocalSymbol local = reference.Local;
        if (local.IsRef)
        {
            return null;
        }

        IOperation root = reference;
        while (root.Parent is { } parent)
        {
            root = parent; // the whole member body: every lambda and local function that could capture the local
        }

        IOperation? value = null;
        foreach (IOperation node in root.DescendantsAndSelf())
        {
            IOperation? written;
            if (node is IVariableDeclaratorOperation declarator && SymbolEqualityComparer.Default.Equals(declarator.Symbol, local))
            {
                written = declarator.Initializer?.Value;
            }
            else if (node is IDeclarationPatternOperation { DeclaredSymbol: { } declared } && SymbolEqualityComparer.Default.Equals(declared, local)
                || node is IRecursivePatternOperation { DeclaredSymbol: { } matched } && SymbolEqualityComparer.Default.Equals(matched, local))
            {
                return null; // `x is T local`: a value the analyzer does not follow
            }
            else if (node is ILocalReferenceOperation use && SymbolEqualityComparer.Default.Equals(use.Local, local))
            {
                if (!TryClassify(use, out written))
                {
                    return null;
                }
            }
            else
            {
                continue;
            }

            if (written is not null)
            {
                if (value is not null)
                {
                    return null; // a second value
                }

                value = written;
            }
        }

        return value;
    }

    /// <summary>
    /// What one use of the local does: false when it may change the local in a way not followed
    /// (compound, ref or deconstruction assignment, ref or out argument, ref alias, address taken);
    /// otherwise true, with the value it assigns when it is a plain assignment's target.
    /// </summary>
    private static bool TryClassify(ILocalReferenceOperation use, out IOperation? written)
    {
        written = null;
        switch (use.Parent)
        {
            case IAssignmentOperation assignment when ReferenceEquals(assignment.Target, use):
                if (assignment is ISimpleAssignmentOperation { IsRef: false } plain)
                {
                    written = plain.Value;
                    return true;
                }

                return false; // compound, ??= or ref assignment of the local
            case ISimpleAssignmentOperation { IsRef: true }: // `alias = ref local`
            case IIncrementOrDecrementOperation:
            case IAddressOfOperation:
            case IConditionalOperation { IsRef: true }:
            case IDeclarationExpressionOperation: // `out var local`, `(var local, ...) = ...`
            case ITupleOperation when InDeconstructionTarget(use):
            case IArgumentOperation { Parameter.RefKind: RefKind.Ref or RefKind.Out }:
            case IVariableInitializerOperation { Parent: IVariableDeclaratorOperation { Symbol.IsRef: true } }: // `ref var alias = ref local`
                return false;
            default:
                return true;
        }
    }

    private static bool InDeconstructionTarget(IOperation use)
    {
        IOperation current = use;
        while (current.Parent is ITupleOperation or IDeclarationExpressionOperation)
        {
            current = current.Parent;
        }

        return current.Parent is IDeconstructionAssignmentOperation deconstruction && ReferenceEquals(deconstruction.Target, current);
    }
}
