using System.Collections.Generic;

namespace OffloadRpc.Analyzers;

/// <summary>
/// OFFRPC1001-1006: an [OffloadService] interface whose contract cannot cross the process boundary.
/// Runs the generator's own parser, so the analyzer reports exactly why the generator emitted nothing.
/// </summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class ContractAnalyzer : OffloadRpcAnalyzer
{
    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; } = ImmutableArray.Create(
        Diagnostics.ReturnTypeRule,
        Diagnostics.CannotCrossRule,
        Diagnostics.CancellationTokenNotLastRule,
        Diagnostics.GenericMethodRule,
        Diagnostics.MethodIdCollisionRule,
        Diagnostics.CannotImplementRule,
        Diagnostics.StreamShapeRule);

    private protected override void OnCompilationStart(CompilationStartAnalysisContext context, OffloadRpcTypes types)
    {
        var parser = new ServiceParser(context.Compilation);
        context.RegisterSymbolAction(symbolContext => Analyze(symbolContext, types.ServiceAttribute, parser), SymbolKind.NamedType);
    }

    private static void Analyze(SymbolAnalysisContext context, INamedTypeSymbol attribute, ServiceParser parser)
    {
        var type = (INamedTypeSymbol)context.Symbol;
        if (type.TypeKind != TypeKind.Interface || !ServiceSymbols.HasAttribute(type, attribute))
        {
            return;
        }

        var problems = new List<ContractProblem>();
        parser.Parse(type, problems, context.CancellationToken);
        foreach (ContractProblem problem in problems)
        {
            context.ReportDiagnostic(Diagnostic.Create(problem.Descriptor, problem.Location ?? type.Locations[0], problem.Message));
        }
    }
}
