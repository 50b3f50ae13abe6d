using System.Diagnostics;
using System.IO.Compression;
using System.Xml.Linq;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// What a user installs: both packages packed into a local folder feed, restored by a fresh project
/// (PackageReference, not ProjectReference) and run as two processes. Restore uses no network: the
/// feed plus this machine's NuGet cache as a second source, into a packages folder of the test's own.
/// </summary>
[Trait("Category", "Package")]
public sealed class PackageRestoreTests
{
    private static readonly string Dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host) ? host : "dotnet";

    [Fact]
    public async Task Both_packages_restore_from_a_local_feed_into_a_fresh_project_that_runs_as_two_processes()
    {
        string repository = Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", ".."));
        string work = Directory.CreateTempSubdirectory("offloadrpc-restore-").FullName;
        try
        {
            string feed = Directory.CreateDirectory(Path.Combine(work, "feed")).FullName;
            foreach (string project in new[] { "src/OffloadRpc/OffloadRpc.csproj", "src/OffloadRpc.Hosting/OffloadRpc.Hosting.csproj" })
            {
                (int packed, string packLog) = await ProcessRunner.RunAsync(Dotnet, ["pack", Path.Combine(repository, project), "-c", "Release", "-o", feed, "-nologo"], TimeSpan.FromMinutes(5));
                Assert.True(packed == 0, packLog);
            }

            foreach (string id in new[] { "OffloadRpc", "OffloadRpc.Hosting" })
            {
                string package = Path.Combine(feed, $"{id}.0.1.0.nupkg");
                Assert.True(File.Exists(Path.Combine(feed, $"{id}.0.1.0.snupkg")), $"{id} has a symbols package");
                using ZipArchive zip = ZipFile.OpenRead(package);
                Assert.Contains(zip.Entries, e => e.FullName == "README.md");
                using Stream nuspecStream = zip.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal)).Open();
                XElement metadata = XDocument.Load(nuspecStream).Root!.Elements().Single(e => e.Name.LocalName == "metadata");
                string Field(string name) => metadata.Elements().Single(e => e.Name.LocalName == name).Value;
                Assert.Equal("0.1.0", Field("version"));
                Assert.Equal("MIT", Field("license"));
                Assert.Equal("README.md", Field("readme"));
                Assert.StartsWith("https://", metadata.Elements().Single(e => e.Name.LocalName == "repository").Attribute("url")!.Value, StringComparison.Ordinal);
            }

            string app = Directory.CreateDirectory(Path.Combine(work, "app")).FullName;
            WriteFreshProject(app, feed);
            (int built, string buildLog) = await ProcessRunner.RunAsync(Dotnet, ["build", Path.Combine(app, "app.csproj"), "-c", "Release", "-nologo"], TimeSpan.FromMinutes(5));
            Assert.True(built == 0, buildLog);
            Assert.True(Directory.Exists(Path.Combine(app, "packages", "offloadrpc.hosting", "0.1.0")), "restored from the feed, not referenced as a project");

            string dll = Path.Combine(app, "bin", "Release", "net10.0", "app.dll");
            string endpoint = $"t{Environment.ProcessId}-packaged";
            using Process server = Process.Start(new ProcessStartInfo(Dotnet, ["exec", dll, "server", endpoint]) { RedirectStandardInput = true, RedirectStandardOutput = true, UseShellExecute = false })!;
            try
            {
                string? ready = await server.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(60));
                Assert.Equal("READY", ready);
                (int called, string output) = await ProcessRunner.RunAsync(Dotnet, ["exec", dll, "client", endpoint], TimeSpan.FromMinutes(1));
                Assert.True(called == 0, output);
                Assert.Contains($"hello world, a packaged client, from process {server.Id}", output, StringComparison.Ordinal);
            }
            finally
            {
                server.StandardInput.Close(); // the host stops when its input closes
                if (!server.WaitForExit(TimeSpan.FromSeconds(20)))
                {
                    server.Kill(entireProcessTree: true);
                }
            }
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }

    /// <summary>
    /// A client-only application: the gRPC client package restored alone into a fresh project, which runs on
    /// the .NET runtime without the ASP.NET Core framework and calls a gRPC server in another process (the
    /// test peer), over gRPC and, with the locality switch on, over shared memory.
    /// </summary>
    [Fact]
    public async Task The_grpc_client_package_alone_gives_a_client_without_ASP_NET_Core_that_calls_a_server_process()
    {
        string repository = Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", ".."));
        string work = Directory.CreateTempSubdirectory("offloadrpc-grpc-client-").FullName;
        string endpoint = Endpoints.Unique("grpc-client-package");
        try
        {
            string feed = Directory.CreateDirectory(Path.Combine(work, "feed")).FullName;
            foreach (string project in new[] { "src/OffloadRpc/OffloadRpc.csproj", "src/OffloadRpc.Grpc.Client/OffloadRpc.Grpc.Client.csproj", "src/OffloadRpc.Grpc/OffloadRpc.Grpc.csproj" })
            {
                (int packed, string packLog) = await ProcessRunner.RunAsync(Dotnet, ["pack", Path.Combine(repository, project), "-c", "Release", "-o", feed, "-nologo"], TimeSpan.FromMinutes(5));
                Assert.True(packed == 0, packLog);
            }

            (XElement clientPackage, string[] clientDependencies) = Nuspec(feed, "OffloadRpc.Grpc.Client");
            Assert.DoesNotContain(clientPackage.Elements(), e => e.Name.LocalName == "frameworkReferences");
            Assert.Contains("Grpc.Net.Client", clientDependencies);
            Assert.DoesNotContain(clientDependencies, id => id.StartsWith("Grpc.AspNetCore", StringComparison.Ordinal) || id == "OffloadRpc.Hosting");
            (XElement serverPackage, string[] serverDependencies) = Nuspec(feed, "OffloadRpc.Grpc");
            Assert.Contains("OffloadRpc.Grpc.Client", serverDependencies); // a server's package brings the client with it
            Assert.Contains("Grpc.AspNetCore", serverDependencies);
            Assert.Contains(serverPackage.Descendants(), e => e.Name.LocalName == "frameworkReference" && (string?)e.Attribute("name") == "Microsoft.AspNetCore.App");

            string app = Directory.CreateDirectory(Path.Combine(work, "app")).FullName;
            WriteFreshProject(app, feed, "OffloadRpc.Grpc.Client", ClientOnlyProgram, Path.Combine(repository, "tests", "OffloadRpc.TestContracts", "Contracts.cs"), await MachineSourcesAsync(work));
            (int built, string buildLog) = await ProcessRunner.RunAsync(Dotnet, ["build", Path.Combine(app, "app.csproj"), "-c", "Release", "-nologo"], TimeSpan.FromMinutes(5));
            Assert.True(built == 0, buildLog);
            Assert.True(Directory.Exists(Path.Combine(app, "packages", "offloadrpc.grpc.client", "0.1.0")), "restored from the feed, not referenced as a project");
            string output = Path.Combine(app, "bin", "Release", "net10.0");
            string runtimeConfig = File.ReadAllText(Path.Combine(output, "app.runtimeconfig.json"));
            Assert.Contains("Microsoft.NETCore.App", runtimeConfig, StringComparison.Ordinal);
            Assert.DoesNotContain("Microsoft.AspNetCore.App", runtimeConfig, StringComparison.Ordinal);
            Assert.False(File.Exists(Path.Combine(output, "Grpc.AspNetCore.Server.dll")), "the server's gRPC library is not shipped with a client");

            await using PeerProcess server = PeerProcess.Start(["grpc-server", endpoint]);
            string address = server.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2];
            string dll = Path.Combine(output, "app.dll");
            (int stayed, string overGrpc) = await ProcessRunner.RunAsync(Dotnet, ["exec", dll, address, "stay"], TimeSpan.FromMinutes(1));
            Assert.True(stayed == 0, overGrpc);
            Assert.Contains($"5 echoed 3145728 bytes intact via OffloadRpcConnection(grpc {address}, connected)", overGrpc, StringComparison.Ordinal);
            (int switched, string overSharedMemory) = await ProcessRunner.RunAsync(Dotnet, ["exec", dll, address, "switch"], TimeSpan.FromMinutes(1));
            Assert.True(switched == 0, overSharedMemory);
            Assert.Contains($"5 echoed 3145728 bytes intact via OffloadRpcConnection(server pid {server.Id}, connected)", overSharedMemory, StringComparison.Ordinal);

            // Trimmed: the core finds the gRPC client by name, and the trimmer must keep it all the same.
            string trimmed = Path.Combine(work, "trimmed");
            (int published, string publishLog) = await ProcessRunner.RunAsync(
                Dotnet, ["publish", Path.Combine(app, "app.csproj"), "-c", "Release", "-r", "linux-x64", "--self-contained", "-p:PublishTrimmed=true", "-o", trimmed, "-nologo"], TimeSpan.FromMinutes(5));
            Assert.True(published == 0, publishLog);
            Assert.True(File.Exists(Path.Combine(trimmed, "OffloadRpc.Grpc.Client.dll")), "the trimmer kept the gRPC client");
            (int trimmedStayed, string trimmedGrpc) = await ProcessRunner.RunAsync(Path.Combine(trimmed, "app"), [address, "stay"], TimeSpan.FromMinutes(1));
            Assert.True(trimmedStayed == 0, trimmedGrpc);
            Assert.Contains($"5 echoed 3145728 bytes intact via OffloadRpcConnection(grpc {address}, connected)", trimmedGrpc, StringComparison.Ordinal);
            (int trimmedSwitched, string trimmedSharedMemory) = await ProcessRunner.RunAsync(Path.Combine(trimmed, "app"), [address, "switch"], TimeSpan.FromMinutes(1));
            Assert.True(trimmedSwitched == 0, trimmedSharedMemory);
            Assert.Contains($"via OffloadRpcConnection(server pid {server.Id}, connected)", trimmedSharedMemory, StringComparison.Ordinal);
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
            Directory.Delete(work, recursive: true);
        }
    }

    /// <summary>A package's nuspec metadata in <paramref name="feed"/> and the ids of its dependencies.</summary>
    private static (XElement Metadata, string[] Dependencies) Nuspec(string feed, string id)
    {
        using ZipArchive zip = ZipFile.OpenRead(Path.Combine(feed, $"{id}.0.1.0.nupkg"));
        using Stream nuspecStream = zip.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal)).Open();
        XElement metadata = XDocument.Load(nuspecStream).Root!.Elements().Single(e => e.Name.LocalName == "metadata");
        return (metadata, [.. metadata.Descendants().Where(e => e.Name.LocalName == "dependency").Select(e => e.Attribute("id")!.Value)]);
    }

    /// <summary>
    /// The package sources this machine is configured with (as seen outside the repository): a self-contained
    /// publish needs the runtime and trimmer packs, which only a run that published before may have cached.
    /// </summary>
    private static async Task<string[]> MachineSourcesAsync(string outside)
    {
        (int listed, string sources) = await ProcessRunner.RunAsync(Dotnet, ["nuget", "list", "source", "--format", "short"], TimeSpan.FromMinutes(1), workingDirectory: outside);
        Assert.True(listed == 0, sources);
        return [.. sources.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Where(line => line.StartsWith("E ", StringComparison.Ordinal)).Select(line => line[2..].Trim())];
    }

    /// <summary>The client-only application: AddAsync and a 3 MiB echo (three 1 MiB frames each way over gRPC), its bytes compared.</summary>
    private const string ClientOnlyProgram = """
        using OffloadRpc;
        using OffloadRpc.TestContracts;

        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(args[0], new OffloadRpcOptions { PreferSharedMemory = args[1] == "switch" });
        IImageService images = connection.GetService<IImageService>();
        byte[] data = new byte[3 << 20];
        new Random(20261207).NextBytes(data);
        byte[] echoed = await images.EchoAsync(data);
        if (!echoed.AsSpan().SequenceEqual(data))
        {
            Console.WriteLine("the echo differs");
            return 1;
        }

        Console.WriteLine($"{await images.AddAsync(2, 3)} echoed {echoed.Length} bytes intact via {connection}");
        return 0;
        """;

    /// <summary>A project outside the repository: its own empty Directory.* files, a nuget.config with the feed and the machine's cache only.</summary>
    private static void WriteFreshProject(string app, string feed) => WriteFreshProject(app, feed, null, null, null, []);

    /// <inheritdoc cref="WriteFreshProject(string, string)"/>
    /// <param name="package">The one OffloadRpc package it references, its Program.cs and a source file it compiles besides (null: the hosted greeter below).</param>
    /// <param name="moreSources">Sources besides the feed and the cache, for every package but OffloadRpc's (which come from the feed alone).</param>
    private static void WriteFreshProject(string app, string feed, string? package, string? program, string? linked, string[] moreSources)
    {
        foreach (string file in new[] { "Directory.Build.props", "Directory.Build.targets", "Directory.Packages.props" })
        {
            File.WriteAllText(Path.Combine(app, file), "<Project />");
        }

        string cache = Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } configured
            ? configured
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        File.WriteAllText(Path.Combine(app, "nuget.config"), $"""
            <?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <packageSources>
                <clear />
                <add key="local-feed" value="{feed}" />
                <add key="machine-cache" value="{cache}" />
                {string.Concat(moreSources.Select((source, i) => $"<add key=\"machine-source-{i}\" value=\"{source}\" />"))}
              </packageSources>
              <packageSourceMapping>
                <packageSource key="local-feed"><package pattern="OffloadRpc" /><package pattern="OffloadRpc.*" /></packageSource>
                <packageSource key="machine-cache"><package pattern="*" /></packageSource>
                {string.Concat(moreSources.Select((_, i) => $"<packageSource key=\"machine-source-{i}\"><package pattern=\"*\" /></packageSource>"))}
              </packageSourceMapping>
            </configuration>
            """);
        string items = package is null
            ? """
              <PackageReference Include="OffloadRpc.Hosting" Version="0.1.0" />
              <PackageReference Include="Microsoft.Extensions.Hosting" Version="10.0.15" />
              """
            : $"""
              <PackageReference Include="{package}" Version="0.1.0" />
              <Compile Include="{linked}" Link="Contracts.cs" />
              """;
        File.WriteAllText(Path.Combine(app, "app.csproj"), $"""
            <Project Sdk="Microsoft.NET.Sdk">
              <PropertyGroup>
                <OutputType>Exe</OutputType>
                <TargetFramework>net10.0</TargetFramework>
                <Nullable>enable</Nullable>
                <ImplicitUsings>enable</ImplicitUsings>
                <RestorePackagesPath>{Path.Combine(app, "packages")}</RestorePackagesPath>
              </PropertyGroup>
              <ItemGroup>
            {items}
              </ItemGroup>
            </Project>
            """);
        if (package is not null)
        {
            File.WriteAllText(Path.Combine(app, "Program.cs"), program);
            return;
        }

        File.WriteAllText(Path.Combine(app, "Program.cs"), """
            using Microsoft.Extensions.DependencyInjection;
            using Microsoft.Extensions.Hosting;
            using Microsoft.Extensions.Logging;
            using OffloadRpc;

            if (args[0] == "server")
            {
                HostApplicationBuilder builder = Host.CreateApplicationBuilder();
                builder.Logging.ClearProviders();
                builder.Services.AddOffloadRpcServer(args[1]).AddService<IGreeter, Greeter>();
                using IHost host = builder.Build();
                await host.StartAsync();
                Console.WriteLine("READY");
                await Task.Run(() => Console.In.ReadToEnd());
                await host.StopAsync();
                return 0;
            }

            var services = new ServiceCollection();
            services.AddOffloadRpcClient<IGreeter>(args[1]);
            await using ServiceProvider provider = services.BuildServiceProvider();
            IGreeter greeter = provider.GetRequiredService<IGreeter>();
            using (OffloadCallScope.Begin().WithHeader("from", "a packaged client"))
            {
                Console.WriteLine(await greeter.GreetAsync("world"));
            }

            return 0;

            [OffloadService]
            public interface IGreeter
            {
                ValueTask<string> GreetAsync(string name, CancellationToken ct = default);
            }

            public sealed class Greeter : IGreeter
            {
                public ValueTask<string> GreetAsync(string name, CancellationToken ct = default) =>
                    ValueTask.FromResult($"hello {name}, {OffloadCallContext.Current!.RequestHeaders["from"]}, from process {Environment.ProcessId}");
            }
            """);
    }
}
