using System.Collections.Generic;
using System.Collections.Immutable;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Diagnostics;
using OffloadRpc.Generators;

namespace OffloadRpc.Analyzers;

/// <summary>
/// OFFRPC1001-1006: an [OffloadService] interface whose contract cannot cross the process boundary.
/// Runs the generator's own parser, so the analyzer reports exactly why the generator emitted nothing.
/// </summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class ContractAnalyzer : DiagnosticAnalyzer
{
    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; } = ImmutableArray.Create(
        Diagnostics.ReturnTypeRule,
        Diagnostics.CannotCrossRule,
        Diagnostics.CancellationTokenNotLastRule,
        Diagnostics.GenericMethodRule,
        Diagnostics.MethodIdCollisionRule,
        Diagnostics.CannotImplementRule);

    public override void Initialize(AnalysisContext context)
    {
        context.EnableConcurrentExecution();
        context.ConfigureGeneratedCodeAnalysis(GeneratedCodeAnalysisFlags.None);
        context.RegisterCompilationStartAction(start =>
        {
            INamedTypeSymbol? attribute = start.Compilation.GetTypeByMetadataName(ServiceParser.OffloadServiceAttribute);
            if (attribute is null)
            {
                return; // OffloadRpc is not referenced
            }

            var parser = new ServiceParser(start.Compilation);
            start.RegisterSymbolAction(symbolContext => Analyze(symbolContext, attribute, parser), SymbolKind.NamedType);
        });
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
