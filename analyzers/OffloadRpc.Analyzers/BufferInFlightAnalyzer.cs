using System.Collections.Generic;

namespace OffloadRpc.Analyzers;

/// <summary>
/// OFFRPC2005: a buffer written after it was passed to an Offload or Pipelined call and before that
/// call was awaited — the copy engine may still be reading it. Per block: a statement that starts
/// such a call without awaiting it, then the later statements up to one that awaits the call's task
/// (all of them when the task is not kept), searched for element writes, Array.Fill/Clear and CopyTo
/// into the buffer local. The call's argument travels as an additional location for the fix.
/// </summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class BufferInFlightAnalyzer : PassedLocalAnalyzer
{
    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; } = ImmutableArray.Create(Diagnostics.WrittenInFlightRule);

    /// <summary>A buffer passed in Offload or Pipelined mode to a call that its own statement does not await.</summary>
    private protected override bool Follows(PassedLocal passed, OffloadRpcTypes types) =>
        !IsAwaited(passed.Call, passed.Statement) && InFlightMode(passed.Parameter, types.TransferAttribute);

    /// <summary>Writes to the buffer up to the statement that awaits the call's task (all later statements when the task is not kept).</summary>
    private protected override void AnalyzeAfter(OperationAnalysisContext context, PassedLocal passed)
    {
        ILocalSymbol? task = TaskLocal(passed.Call);
        foreach (IOperation later in passed.LaterStatements())
        {
            if (task is not null && Awaits(later, task))
            {
                break;
            }

            foreach (IOperation write in Writes(later, passed.Local))
            {
                context.ReportDiagnostic(Diagnostic.Create(Diagnostics.WrittenInFlightRule, write.Syntax.GetLocation(), additionalLocations: [passed.Argument.Syntax.GetLocation()], passed.Local.Name));
            }
        }
    }

    private static IEnumerable<IOperation> Writes(IOperation operation, ILocalSymbol buffer)
    {
        foreach (IOperation node in operation.DescendantsAndSelf())
        {
            switch (node)
            {
                case IAssignmentOperation { Target: IArrayElementReferenceOperation element } when IsLocal(element.ArrayReference, buffer):
                    yield return node;
                    break;
                case IInvocationOperation call when call.TargetMethod.Name is "Fill" or "Clear" && call.TargetMethod.ContainingType?.SpecialType == SpecialType.System_Array && call.Arguments.Length > 0 && IsLocal(call.Arguments[0].Value, buffer):
                    yield return node;
                    break;
                case IInvocationOperation call when call.TargetMethod.Name == "CopyTo" && call.Arguments.Length > 0 && IsLocal(call.Arguments[0].Value, buffer):
                    yield return node;
                    break;
            }
        }
    }

    private static bool IsLocal(IOperation operation, ILocalSymbol local) =>
        ServiceSymbols.Unwrap(operation) is ILocalReferenceOperation reference && SymbolEqualityComparer.Default.Equals(reference.Local, local);

    /// <summary>The local the call's task is stored in (`var t = service.X(...)`), if any.</summary>
    private static ILocalSymbol? TaskLocal(IInvocationOperation invocation)
    {
        IOperation? parent = invocation.Parent;
        while (parent is IConversionOperation)
        {
            parent = parent.Parent;
        }

        return parent switch
        {
            IVariableInitializerOperation { Parent: IVariableDeclaratorOperation declarator } => declarator.Symbol,
            ISimpleAssignmentOperation { Target: ILocalReferenceOperation target } => target.Local,
            _ => null,
        };
    }

    private static bool Awaits(IOperation operation, ILocalSymbol task)
    {
        foreach (IOperation node in operation.DescendantsAndSelf())
        {
            if (node is IAwaitOperation awaited)
            {
                foreach (IOperation inner in awaited.Operation.DescendantsAndSelf())
                {
                    if (inner is ILocalReferenceOperation reference && SymbolEqualityComparer.Default.Equals(reference.Local, task))
                    {
                        return true;
                    }
                }
            }
        }

        return false;
    }

    /// <summary>Awaited within its own statement (`await service.X(...)`, with or without ConfigureAwait).</summary>
    private static bool IsAwaited(IOperation invocation, IOperation statement)
    {
        for (IOperation? parent = invocation.Parent; parent is not null && !ReferenceEquals(parent, statement.Parent); parent = parent.Parent)
        {
            if (parent is IAwaitOperation)
            {
                return true;
            }
        }

        return false;
    }

    /// <summary>A mode in which the bytes are still being read after the call returned its task.</summary>
    private static bool InFlightMode(IParameterSymbol parameter, INamedTypeSymbol transfer) =>
        TransferAttributeReader.ReadDeciding(parameter, transfer) is { Mode: TransferMode.Offload or TransferMode.Pipelined };
}
