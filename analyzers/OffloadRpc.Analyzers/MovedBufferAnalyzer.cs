namespace OffloadRpc.Analyzers;

/// <summary>
/// OFFRPC2006: a SharedBuffer local used or disposed after it was passed to a service call (its
/// ownership moved; the lease is gone). Conservative: only later statements of the block that holds
/// the call are looked at, and a reassignment of the local ends the search; a `using` declaration's
/// implicit dispose is fine (disposing a moved lease does nothing).
/// </summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class MovedBufferAnalyzer : OffloadRpcAnalyzer
{
    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; } = ImmutableArray.Create(Diagnostics.UsedAfterMoveRule);

    /// <summary>Per block (diagnostics stay local to what was analyzed): each statement that moves a local lease into a service call, then the statements after it in the same block.</summary>
    private protected override void OnCompilationStart(CompilationStartAnalysisContext context, OffloadRpcTypes types) =>
        context.RegisterOperationAction(c => AnalyzeBlock(c, types.ServiceAttribute, types.SharedBuffer), OperationKind.Block);

    private static void AnalyzeBlock(OperationAnalysisContext context, INamedTypeSymbol service, INamedTypeSymbol sharedBuffer)
    {
        var block = (IBlockOperation)context.Operation;
        for (int s = 0; s < block.Operations.Length; s++)
        {
            foreach (IOperation descendant in block.Operations[s].DescendantsAndSelf())
            {
                if (descendant is not IInvocationOperation invocation
                    || invocation.TargetMethod.ContainingType is not { TypeKind: TypeKind.Interface } type
                    || !ServiceSymbols.HasAttribute(type, service)
                    || InNestedBlock(invocation, block))
                {
                    continue;
                }

                foreach (IArgumentOperation argument in invocation.Arguments)
                {
                    if (!SymbolEqualityComparer.Default.Equals(argument.Parameter?.Type, sharedBuffer) || ServiceSymbols.Unwrap(argument.Value) is not ILocalReferenceOperation moved)
                    {
                        continue;
                    }

                    for (int next = s + 1; next < block.Operations.Length; next++)
                    {
                        if (Scan(block.Operations[next], moved.Local, context))
                        {
                            break;
                        }
                    }
                }
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
