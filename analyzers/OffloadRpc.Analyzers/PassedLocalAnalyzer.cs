using System.Collections.Generic;

namespace OffloadRpc.Analyzers;

/// <summary>
/// What the buffer-lifetime analyzers (OFFRPC2005, OFFRPC2006) do the same way. Per block (diagnostics
/// stay local to what was analyzed): each local that a statement passes to a service call, then the
/// statements after it in the same block. A rule says which of those locals it follows and what it
/// looks for after the call.
/// </summary>
public abstract class PassedLocalAnalyzer : OffloadRpcAnalyzer
{
    private protected PassedLocalAnalyzer()
    {
    }

    private protected sealed override void OnCompilationStart(CompilationStartAnalysisContext context, OffloadRpcTypes types) =>
        context.RegisterOperationAction(c => AnalyzeBlock(c, types), OperationKind.Block);

    /// <summary>Whether this rule follows <paramref name="passed"/> into the statements after its call.</summary>
    private protected abstract bool Follows(PassedLocal passed, OffloadRpcTypes types);

    /// <summary>Reports what this rule finds in <see cref="PassedLocal.LaterStatements"/>.</summary>
    private protected abstract void AnalyzeAfter(OperationAnalysisContext context, PassedLocal passed);

    private void AnalyzeBlock(OperationAnalysisContext context, OffloadRpcTypes types)
    {
        foreach (PassedLocal passed in PassedLocal.In((IBlockOperation)context.Operation, types.ServiceAttribute))
        {
            if (Follows(passed, types))
            {
                AnalyzeAfter(context, passed);
            }
        }
    }
}

/// <summary>A local that a statement of <see cref="Block"/> passes to a method of an [OffloadService] interface.</summary>
internal readonly record struct PassedLocal(IBlockOperation Block, int StatementIndex, IInvocationOperation Call, IArgumentOperation Argument, IParameterSymbol Parameter, ILocalSymbol Local)
{
    /// <summary>The statement of <see cref="Block"/> that makes the call (the call may sit deeper inside it).</summary>
    public IOperation Statement => Block.Operations[StatementIndex];

    /// <summary>Every local passed to a service call in <paramref name="block"/>: by statement, then call, then argument.</summary>
    public static IEnumerable<PassedLocal> In(IBlockOperation block, INamedTypeSymbol service)
    {
        for (int s = 0; s < block.Operations.Length; s++)
        {
            foreach (IOperation descendant in block.Operations[s].DescendantsAndSelf())
            {
                if (descendant is not IInvocationOperation invocation || !ServiceSymbols.IsServiceMethod(invocation.TargetMethod, service))
                {
                    continue;
                }

                foreach (IArgumentOperation argument in invocation.Arguments)
                {
                    if (argument.Parameter is { } parameter && ServiceSymbols.Unwrap(argument.Value) is ILocalReferenceOperation local)
                    {
                        yield return new PassedLocal(block, s, invocation, argument, parameter, local.Local);
                    }
                }
            }
        }
    }

    /// <summary>The statements of <see cref="Block"/> after <see cref="Statement"/>, in order.</summary>
    public IEnumerable<IOperation> LaterStatements()
    {
        for (int next = StatementIndex + 1; next < Block.Operations.Length; next++)
        {
            yield return Block.Operations[next];
        }
    }
}
