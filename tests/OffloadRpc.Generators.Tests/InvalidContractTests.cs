using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using OffloadRpc.Generators.Models;
using Xunit;

namespace OffloadRpc.Generators.Tests;

/// <summary>A contract that cannot cross the process boundary generates nothing (the analyzers explain why), and adds no error.</summary>
public sealed class InvalidContractTests
{
    private const string Usings = """
        using System;
        using System.Collections.Generic;
        using System.Threading;
        using System.Threading.Tasks;
        using OffloadRpc;

        namespace Invalid;

        """;

    /// <summary>Each body is valid C#: only the contract is wrong. The id is the problem the parser (and so the analyzers) reports.</summary>
    public static TheoryData<string, string, string> Contracts => new()
    {
        { "returns int", "OFFRPC1001", "[OffloadService] public interface IService { int Add(int a, int b); }" },
        { "returns void", "OFFRPC1001", "[OffloadService] public interface IService { void Fire(int a); }" },
        { "Task of IAsyncEnumerable", "OFFRPC1007", "[OffloadService] public interface IService { Task<IAsyncEnumerable<int>> StreamAsync(); }" },
        { "ValueTask of IAsyncEnumerable", "OFFRPC1007", "[OffloadService] public interface IService { ValueTask<IAsyncEnumerable<byte>> StreamAsync(); }" },
        { "a stream of streams", "OFFRPC1007", "[OffloadService] public interface IService { IAsyncEnumerable<IAsyncEnumerable<int>> StreamAsync(); }" },
        { "a stream of Stream", "OFFRPC1007", "[OffloadService] public interface IService { IAsyncEnumerable<System.IO.Stream> StreamAsync(); }" },
        { "two streamed arguments", "OFFRPC1007", "[OffloadService] public interface IService { Task SendAsync(IAsyncEnumerable<ReadOnlyMemory<byte>> a, IAsyncEnumerable<ReadOnlyMemory<byte>> b); }" },
        { "a stream of items that cannot cross", "OFFRPC1002", "[OffloadService] public interface IService { IAsyncEnumerable<Action> StreamAsync(); }" },
        { "a Stream result", "OFFRPC1002", "[OffloadService] public interface IService { Task<System.IO.Stream> ReadAsync(); }" },
        { "ref parameter", "OFFRPC1002", "[OffloadService] public interface IService { Task AddAsync(ref int a); }" },
        { "out parameter", "OFFRPC1002", "[OffloadService] public interface IService { Task TryAsync(out int a); }" },
        { "in parameter", "OFFRPC1002", "[OffloadService] public interface IService { Task AddAsync(in long a); }" },
        { "generic method", "OFFRPC1004", "[OffloadService] public interface IService { Task<T> EchoAsync<T>(T value); }" },
        { "property", "OFFRPC1006", "[OffloadService] public interface IService { Task PingAsync(); int Count { get; } }" },
        { "event", "OFFRPC1006", "[OffloadService] public interface IService { Task PingAsync(); event EventHandler Changed; }" },
        { "CancellationToken not last", "OFFRPC1003", "[OffloadService] public interface IService { Task WaitAsync(CancellationToken ct, int milliseconds); }" },
        { "generic interface", "OFFRPC1006", "[OffloadService] public interface IService<T> { Task<int> CountAsync(int value); }" },
        { "Span<byte> parameter", "OFFRPC1002", "[OffloadService] public interface IService { Task<int> SumAsync(Span<byte> data); }" },
        { "ReadOnlySpan<char> parameter", "OFFRPC1002", "[OffloadService] public interface IService { Task<int> LengthAsync(ReadOnlySpan<char> text); }" },
        { "delegate parameter", "OFFRPC1002", "[OffloadService] public interface IService { Task RunAsync(Func<int, int> callback); }" },
        { "delegate result", "OFFRPC1002", "[OffloadService] public interface IService { Task<Action> GetAsync(); }" },
        { "buffer of managed elements", "OFFRPC1002", "[OffloadService] public interface IService { Task SendAsync(ReadOnlyMemory<string> names); }" },
        { "multi-dimensional array", "OFFRPC1002", "[OffloadService] public interface IService { Task SendAsync(int[,] grid); }" },
        { "nested in a class", "OFFRPC1006", "public static class Outer { [OffloadService] public interface IService { Task PingAsync(); } }" },
        { "inherits members", "OFFRPC1006", "public interface IBase { Task PingAsync(); } [OffloadService] public interface IService : IBase { Task PongAsync(); }" },
        { "two methods with one method id", "OFFRPC1005", "[OffloadService] public interface IService { Task SendAsync(byte[] data); Task SendAsync(ReadOnlyMemory<byte> data); }" },
        { "a class MessagePack cannot serialize", "OFFRPC1002", "public sealed class Plain { public int X { get; set; } } [OffloadService] public interface IService { Task SendAsync(Plain value); }" },
        { "a list of a class MessagePack cannot serialize", "OFFRPC1002", "public struct Point { public int X; } [OffloadService] public interface IService { Task<List<Point>> GetAsync(); }" },
        { "dynamic parameter", "OFFRPC1002", "[OffloadService] public interface IService { Task SendAsync(dynamic value); }" },
        { "static abstract member", "OFFRPC1006", "[OffloadService] public interface IService { Task PingAsync(); static abstract Task CreateAsync(); }" },
        { "one bad method among good ones", "OFFRPC1002", "[OffloadService] public interface IService { Task PingAsync(); Task<int> AddAsync(int a, int b); ValueTask<int> BadAsync(ref int a); }" },
    };

    [Theory]
    [MemberData(nameof(Contracts))]
    public void InvalidContractGeneratesNothing(string why, string problemId, string declaration)
    {
        _ = problemId;
        GeneratorRun run = GeneratorHarness.Run(Usings + declaration);

        Diagnostic[] inputErrors = run.Input.GetDiagnostics().Where(d => d.Severity == DiagnosticSeverity.Error).ToArray();
        Assert.True(inputErrors.Length == 0, $"The '{why}' input is not valid C#:{Environment.NewLine}{GeneratorHarness.Format(inputErrors)}");

        Assert.Empty(run.DriverDiagnostics);
        Assert.Null(run.Result.Exception);
        Assert.Empty(run.Result.GeneratedSources);
        Assert.Empty(run.RunResult.GeneratedTrees);
        Assert.Equal(run.Input.SyntaxTrees, run.Output.SyntaxTrees);

        Diagnostic[] outputErrors = run.Output.GetDiagnostics().Where(d => d.Severity == DiagnosticSeverity.Error).ToArray();
        Assert.True(outputErrors.Length == 0, $"The generator added errors:{Environment.NewLine}{GeneratorHarness.Format(outputErrors)}");
    }

    /// <summary>
    /// Nothing is generated because the parser rejected the contract (a null model), for the expected
    /// reason. Roslyn records only the steps that feed an output, so an all-null Services step is not
    /// visible in TrackedSteps: the parser is asked directly.
    /// </summary>
    [Theory]
    [MemberData(nameof(Contracts))]
    public void ParserRejectsInvalidContractWithTheExpectedProblem(string why, string problemId, string declaration)
    {
        CSharpCompilation compilation = GeneratorHarness.CreateCompilation(Usings + declaration);
        INamedTypeSymbol service = FindService(compilation);

        var problems = new List<ContractProblem>();
        ServiceModel? model = new ServiceParser(compilation).Parse(service, problems, CancellationToken.None);

        Assert.Null(model);
        Assert.True(problems.Any(p => p.Descriptor.Id == problemId), $"'{why}': expected a {problemId} problem, got: {string.Join("; ", problems.Select(p => p.Descriptor.Id + " " + p.Message))}");
    }

    [Fact]
    public void ParserAcceptsTheGoldenContracts()
    {
        foreach (string source in TestInputs.GoldenCases.Values)
        {
            CSharpCompilation compilation = GeneratorHarness.CreateCompilation(source);
            var problems = new List<ContractProblem>();
            ServiceModel? model = new ServiceParser(compilation).Parse(FindService(compilation), problems, CancellationToken.None);

            Assert.Empty(problems);
            Assert.NotNull(model);
        }
    }

    private static INamedTypeSymbol FindService(CSharpCompilation compilation)
    {
        INamedTypeSymbol attribute = compilation.GetTypeByMetadataName(ServiceParser.OffloadServiceAttribute)!;
        var services = new List<INamedTypeSymbol>();
        var pending = new Stack<INamespaceOrTypeSymbol>([compilation.Assembly.GlobalNamespace]);
        while (pending.Count > 0)
        {
            foreach (ISymbol member in pending.Pop().GetMembers())
            {
                if (member is INamespaceOrTypeSymbol container)
                {
                    pending.Push(container);
                }

                if (member is INamedTypeSymbol type && type.GetAttributes().Any(a => SymbolEqualityComparer.Default.Equals(a.AttributeClass, attribute)))
                {
                    services.Add(type);
                }
            }
        }

        return Assert.Single(services);
    }

    [Fact]
    public void ValidServiceBesideAnInvalidOneIsStillGenerated()
    {
        GeneratorRun run = GeneratorHarness.Run(
            Usings + "[OffloadService] public interface IBad { int Add(int a, int b); }",
            Usings + "[OffloadService] public interface IGood { Task<int> AddAsync(int a, int b); }");

        Assert.Empty(run.DriverDiagnostics);
        Assert.Equal(
            ["Invalid.IGood.Proxy.g.cs", "Invalid.IGood.Registration.g.cs", "Invalid.IGood.Stub.g.cs"],
            run.Sources.Keys.Order(StringComparer.Ordinal));
    }

    [Fact]
    public void InterfaceWithoutTheAttributeGeneratesNothing()
    {
        GeneratorRun run = GeneratorHarness.Run(Usings + "public interface IPlain { Task<int> AddAsync(int a, int b); }");

        Assert.Empty(run.DriverDiagnostics);
        Assert.Empty(run.Result.GeneratedSources);
    }
}
