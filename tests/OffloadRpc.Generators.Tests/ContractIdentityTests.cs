using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using Xunit;

namespace OffloadRpc.Generators.Tests;

/// <summary>
/// Method ids and the contract hash are what two processes compare: they must depend on the wire
/// contract (names of service and methods, parameter and result types) and on nothing else.
/// </summary>
public sealed partial class ContractIdentityTests
{
    private const string Template = """
        using System;
        using System.Threading;
        using System.Threading.Tasks;
        using OffloadRpc;

        namespace Identity;

        [OffloadService]
        public interface IScaler
        {
            Task<int> ScaleAsync(int value, int factor, CancellationToken ct = default);

            ValueTask<double> SumAsync(ReadOnlyMemory<float> values);

            Task ResetAsync();
        }
        """;

    private const string RegistrationHint = "Identity.IScaler.Registration.g.cs";

    [Fact]
    public void SameInterfaceCompiledTwiceYieldsTheSameSources()
    {
        GeneratorRun first = GeneratorHarness.Run(Template);
        GeneratorRun second = GeneratorHarness.Run(Template);

        Assert.Equal(first.Sources[RegistrationHint], second.Sources[RegistrationHint]);
        Assert.Equal(first.Sources, second.Sources);
    }

    [Fact]
    public void DeclarationOrderDoesNotChangeIdsOrHash()
    {
        string reordered = Template.Replace(
            "    Task ResetAsync();\n",
            string.Empty,
            StringComparison.Ordinal).Replace(
            "public interface IScaler\n{\n",
            "public interface IScaler\n{\n    Task ResetAsync();\n\n",
            StringComparison.Ordinal);
        Assert.NotEqual(Template, reordered);

        AssertSameIdentity(Registration(Template), Registration(reordered));
    }

    [Fact]
    public void RenamingAParameterKeepsIdsAndHash()
    {
        string renamed = Template.Replace("int value, int factor", "int input, int multiplier", StringComparison.Ordinal);
        Assert.NotEqual(Template, renamed);

        (ulong hash, int[] ids) before = Registration(Template);
        (ulong hash, int[] ids) after = Registration(renamed);

        Assert.Equal(before.ids, after.ids);
        Assert.Equal(before.hash, after.hash);
    }

    [Fact]
    public void RenamingTheCancellationTokenOrDroppingItsDefaultKeepsIdsAndHash()
    {
        string edited = Template.Replace("CancellationToken ct = default", "CancellationToken cancellationToken", StringComparison.Ordinal);
        Assert.NotEqual(Template, edited);

        AssertSameIdentity(Registration(Template), Registration(edited));
    }

    [Fact]
    public void ChangingAParameterTypeChangesThatMethodsIdAndTheHash()
    {
        string widened = Template.Replace("int value, int factor", "long value, int factor", StringComparison.Ordinal);
        Assert.NotEqual(Template, widened);

        (ulong hash, int[] ids) before = Registration(Template);
        (ulong hash, int[] ids) after = Registration(widened);

        Assert.NotEqual(before.hash, after.hash);
        Assert.Equal(before.ids.Length, after.ids.Length);
        Assert.Equal(before.ids.Length - 1, before.ids.Intersect(after.ids).Count()); // only ScaleAsync's id moved
    }

    [Fact]
    public void ChangingAResultTypeChangesTheHashButNotTheIds()
    {
        string edited = Template.Replace("ValueTask<double> SumAsync", "ValueTask<float> SumAsync", StringComparison.Ordinal);
        Assert.NotEqual(Template, edited);

        (ulong hash, int[] ids) before = Registration(Template);
        (ulong hash, int[] ids) after = Registration(edited);

        Assert.NotEqual(before.hash, after.hash);
        Assert.Equal(before.ids, after.ids); // a method id names the method and its parameters; the hash covers results
    }

    [Fact]
    public void RenamingAMethodChangesItsIdAndTheHash()
    {
        string edited = Template.Replace("ResetAsync", "ClearAsync", StringComparison.Ordinal);

        (ulong hash, int[] ids) before = Registration(Template);
        (ulong hash, int[] ids) after = Registration(edited);

        Assert.NotEqual(before.hash, after.hash);
        Assert.Equal(before.ids.Length - 1, before.ids.Intersect(after.ids).Count());
    }

    /// <summary>
    /// Ids are FNV-1a of a canonical signature text, so any implementation (a peer in another
    /// language, a future generator) can recompute them; pinned here against an independent computation.
    /// </summary>
    [Fact]
    public void MethodIdIsFnv1aOfTheCanonicalSignature()
    {
        (_, int[] ids) = Registration(Template);

        Assert.Contains(Fnv1a31("Identity.IScaler.ScaleAsync(int,int)"), ids);
        Assert.Contains(Fnv1a31("Identity.IScaler.SumAsync(buffer<float>)"), ids);
        Assert.Contains(Fnv1a31("Identity.IScaler.ResetAsync()"), ids);
    }

    private static int Fnv1a31(string text)
    {
        uint hash = 2166136261;
        foreach (byte b in Encoding.UTF8.GetBytes(text))
        {
            hash = unchecked((hash ^ b) * 16777619);
        }

        int id = (int)(hash & 0x7FFF_FFFF);
        return id == 0 ? 1 : id;
    }

    private static void AssertSameIdentity((ulong Hash, int[] Ids) expected, (ulong Hash, int[] Ids) actual)
    {
        Assert.Equal(expected.Hash, actual.Hash);
        Assert.Equal(expected.Ids, actual.Ids);
    }

    /// <summary>The contract hash and method ids written into the registration source.</summary>
    private static (ulong Hash, int[] Ids) Registration(string source)
    {
        GeneratorRun run = GeneratorHarness.Run(source);
        Assert.Empty(run.DriverDiagnostics);
        string text = run.Sources[RegistrationHint];

        Match hash = HashPattern().Match(text);
        Match ids = IdsPattern().Match(text);
        Assert.True(hash.Success && ids.Success, "Unexpected registration source:\n" + text);
        return (
            ulong.Parse(hash.Groups[1].Value, NumberStyles.HexNumber, CultureInfo.InvariantCulture),
            MethodIdPattern().Matches(ids.Groups[1].Value)
                .Select(id => int.Parse(id.Groups[1].Value, CultureInfo.InvariantCulture))
                .ToArray());
    }

    [GeneratedRegex(@"\b0x([0-9A-F]{16})UL\b")]
    private static partial Regex HashPattern();

    /// <summary>The registration's list of the proxy's method descriptors (each named by its id).</summary>
    [GeneratedRegex(@"MethodDescriptor\[\] \{([^}]*)\}")]
    private static partial Regex IdsPattern();

    [GeneratedRegex(@"\.Method([0-9]+)\b")]
    private static partial Regex MethodIdPattern();
}
