using Microsoft.CodeAnalysis;
using Xunit;

namespace OffloadRpc.Generators.Tests;

/// <summary>Contracts that once broke the emitted code: each must generate code that compiles without a diagnostic.</summary>
public sealed class EdgeCaseTests
{
    private const string Usings = """
        using System;
        using System.Threading;
        using System.Threading.Tasks;
        using OffloadRpc;

        """;

    public static TheoryData<string, string> Contracts => new()
    {
        { "keyword in the namespace", "namespace P.@event { [OffloadService] public interface IService { Task<int> PingAsync(int value); } }" },
        {
            "parameters named like generated members",
            "namespace P { [OffloadService] public interface IService { Task<int> SumAsync(int _connection, int __writer, int __request, int __reader, int reply, int reader, CancellationToken __call); Task SetAsync(byte[] _implementation, int __result, int result, int writer, int response); } }"
        },
        { "value-returning method on C# 12", "namespace P { [OffloadService] public interface IService { ValueTask<long> TwiceAsync(long value); Task<string?> NameAsync(); } }" },
    };

    [Theory]
    [MemberData(nameof(Contracts))]
    public void Generated_code_compiles_without_diagnostics(string why, string declaration)
    {
        GeneratorRun run = GeneratorHarness.Run(Usings + declaration);
        Assert.Empty(run.DriverDiagnostics);
        Assert.True(run.Result.GeneratedSources.Length == 3, $"{why}: expected a proxy, a stub and a registration");
        Diagnostic[] problems = run.Output.GetDiagnostics().Where(d => d.Severity >= DiagnosticSeverity.Warning).ToArray();
        Assert.True(problems.Length == 0, $"{why}:\n{GeneratorHarness.Format(problems)}");
    }

    [Fact]
    public void Making_a_parameter_nullable_changes_the_wire_identity()
    {
        string Registration(string type) => GeneratorHarness
            .Run(Usings + $"namespace P {{ [OffloadService] public interface IService {{ Task<int> SetAsync({type} value); }} }}")
            .Sources["P.IService.Registration.g.cs"];

        // int? travels as MessagePack (nil possible); int as a plain integer: a server of one must refuse a client of the other.
        Assert.NotEqual(Registration("int"), Registration("int?"));
        // A nullable reference annotation changes nothing on the wire.
        Assert.Equal(Registration("string"), Registration("string?"));
    }
}
