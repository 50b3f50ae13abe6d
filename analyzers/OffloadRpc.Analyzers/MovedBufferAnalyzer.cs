namespace OffloadRpc.Analyzers;

/// <summary>
/// OFFRPC2006: a SharedBuffer local used or disposed after it was passed to a service call (its
/// ownership moved; the lease is gone). Conservative: only later statements of the block that holds
/// the call are looked at, and a reassignment of the local ends the search; a `using` declaration's
/// implicit dispose is fine (disposing a moved lease does nothing).
/// </summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class MovedBufferAnalyzer : PassedLocalAnalyzer
{
    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; } = ImmutableArray.Create(Diagnostics.UsedAfterMoveRule);

    /// <summary>A SharedBuffer moved by a call of this block itself, not of a block nested in it.</summary>
    private protected override bool Follows(PassedLocal passed, OffloadRpcTypes types) =>
        SymbolEqualityComparer.Default.Equals(passed.Parameter.Type, types.SharedBuffer) && !InNestedBlock(passed.Call, passed.Block);

    /// <summary>Uses of the lease, up to a reassignment of the local.</summary>
    private protected override void AnalyzeAfter(OperationAnalysisContext context, PassedLocal passed)
    {
        foreach (IOperation later in passed.LaterStatements())
        {
            if (Scan(later, passed.Local, context))
            {
                break;
            }
        }
    }

    /// <summary>True when the call sits in a block nested inside <paramref name="block"/> (that block's own analysis covers it).</summary>
    private static bool InNestedBlock(IOperation operation, IBlockOperation block)
    {
        for (IOperation? parent = operation.Parent; parent is not null && !ReferenceEquals(parent, block); parent = parent.Parent)
        {
            if (parent is IBlockOperation)
            {
                return true;
            }
        }

        return false;
    }

    /// <summary>Reports uses of <paramref name="local"/> in <paramref name="operation"/>; true when the local is reassigned (later uses are of a new buffer).</summary>
    private static bool Scan(IOperation operation, ILocalSymbol local, OperationAnalysisContext context)
    {
        foreach (IOperation descendant in operation.DescendantsAndSelf())
        {
            if (descendant is ILocalReferenceOperation reference && SymbolEqualityComparer.Default.Equals(reference.Local, local))
            {
                if (reference.Parent is ISimpleAssignmentOperation assignment && ReferenceEquals(assignment.Target, reference))
                {
                    return true;
                }

                context.ReportDiagnostic(Diagnostic.Create(Diagnostics.UsedAfterMoveRule, reference.Syntax.GetLocation(), local.Name));
            }
        }

        return false;
    }
}
