using System.Collections.Generic;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp.Syntax;
using OffloadRpc.Generators.Models;

namespace OffloadRpc.Generators;

/// <summary>
/// For every [OffloadService] interface: a client proxy, a server stub, and a module initializer
/// that registers both. Invalid contracts emit nothing (the analyzers say why), so a half-generated
/// proxy never adds compiler errors that hide the real problem.
/// </summary>
[Generator(LanguageNames.CSharp)]
public sealed class ServiceGenerator : IIncrementalGenerator
{
    /// <summary>Names of the pipeline steps, for incrementality tests.</summary>
    public static class TrackingNames
    {
        public const string Services = nameof(Services);
        public const string ValidServices = nameof(ValidServices);
    }

    public void Initialize(IncrementalGeneratorInitializationContext context)
    {
        IncrementalValuesProvider<ServiceModel?> services = context.SyntaxProvider
            .ForAttributeWithMetadataName(
                ServiceParser.OffloadServiceAttribute,
                predicate: static (node, _) => node is InterfaceDeclarationSyntax,
                transform: static (context, cancellationToken) =>
                    context.TargetSymbol is INamedTypeSymbol service
                        ? new ServiceParser(context.SemanticModel.Compilation).Parse(service, new List<ContractProblem>(), cancellationToken)
                        : null)
            .WithTrackingName(TrackingNames.Services);

        IncrementalValuesProvider<ServiceModel> valid = services
            .Where(static model => model is not null)
            .Select(static (model, _) => model!)
            .WithTrackingName(TrackingNames.ValidServices);

        context.RegisterSourceOutput(valid, static (output, service) =>
        {
            string prefix = service.HintPrefix;
            output.AddSource(prefix + ".Proxy.g.cs", ServiceEmitter.EmitProxy(service));
            output.AddSource(prefix + ".Stub.g.cs", ServiceEmitter.EmitStub(service));
            output.AddSource(prefix + ".Registration.g.cs", ServiceEmitter.EmitRegistration(service));
        });
    }
}
