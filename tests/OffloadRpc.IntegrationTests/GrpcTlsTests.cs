using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Grpc.Core;
using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Grpc;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// The gRPC transport as it is deployed between hosts: HTTPS with the server's certificate (self-signed,
/// made by the test, pinned by the client), and ASP.NET Core authentication in front of every method
/// (<c>MapOffloadRpcGrpc().RequireAuthorization()</c>, a bearer token). One server process (TestPeer
/// grpc-server --tls --token) on 127.0.0.1; the client is this process.
/// </summary>
public sealed class GrpcTlsTests
{
    private const string Token = "s3cret-t0ken";

    [Fact]
    public async Task Over_TLS_with_a_bearer_token_calls_cross_and_a_caller_the_server_refuses_gets_UnauthorizedAccessException()
    {
        string directory = Directory.CreateTempSubdirectory("offloadrpc-tls-").FullName;
        string endpoint = Endpoints.Unique("tls");
        try
        {
            using X509Certificate2 certificate = SelfSigned();
            string pfx = Path.Combine(directory, "server.pfx");
            await File.WriteAllBytesAsync(pfx, certificate.Export(X509ContentType.Pkcs12));
            await using PeerProcess process = PeerProcess.Start(["grpc-server", endpoint, "--tls", pfx, "--token", Token]);
            string address = process.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2];
            Assert.StartsWith("https://127.0.0.1:", address, StringComparison.Ordinal);
            var token = new StrongBox<string?>(Token);

            // Pinned certificate, right token, told to stay on gRPC: every kind of call crosses TLS, checked by content.
            await using (OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, Options(certificate, token, preferSharedMemory: false)))
            {
                Assert.False(connection.UsesSharedMemory);
                IImageService images = connection.GetService<IImageService>();
                Assert.Equal(5, await images.AddAsync(2, 3));
                byte[] data = new byte[(9 << 20) + 3]; // ten 1 MiB frames of a request stream
                Checksum64.Fill(data, 31);
                Assert.Equal(Checksum64.Compute(data), await images.ChecksumAsync(data));
                byte[] echoed = await images.EchoAsync(data); // and of a response stream
                Assert.Equal(Checksum64.Compute(data), Checksum64.Compute(echoed));
                int frames = 0;
                await foreach (ReadOnlyMemory<byte> frame in connection.GetService<IFrameSource>().FramesAsync(3, 100_000, 40))
                {
                    byte[] expected = new byte[100_000];
                    Checksum64.Fill(expected, (ulong)(40 + frames++));
                    Assert.True(frame.Span.SequenceEqual(expected));
                }

                Assert.Equal(3, frames);
                Assert.Equal((3L * 70_000) - 3, await connection.GetService<IKitchenSink>().CountBytesAsync(Chunks(3, 70_000))); // chunks gathered into one buffer
                Assert.Equal(50, await connection.GetService<IFrameSource>().CountTicksAsync(Ticks(50))); // a streamed argument: items as the server's credit allows
                ulong[] words = [.. Enumerable.Range(0, 3000).Select(i => (ulong)i * 0x9E3779B97F4A7C15UL)];
                var each = new List<string>();
                await foreach (string line in connection.GetService<ICallProbe>().ChecksumEachAsync(Words(words, 1000))) // duplex: an item back for each in
                {
                    each.Add(line.Split(' ')[0]);
                }

                Assert.Equal([.. words.Chunk(1000).Select(c => Checksum64.Compute(System.Runtime.InteropServices.MemoryMarshal.AsBytes(c.AsSpan())).ToString(System.Globalization.CultureInfo.InvariantCulture))], each);
                RemoteInvocationException failed = await Assert.ThrowsAsync<RemoteInvocationException>(() => connection.GetService<IKitchenSink>().FailAsync("over tls"));
                Assert.Equal(typeof(InvalidOperationException).FullName, failed.RemoteExceptionType);

                // The implementation's side sees whom ASP.NET Core authenticated (IHttpContextAccessor), for finer checks of its own.
                Assert.Contains("caller AddAsync caller", await connection.GetService<ICallProbe>().ServerLogAsync());

                // The token goes bad (revoked, expired): each call, unary or streaming, is refused, typed; the connection serves on once it is good again.
                token.Value = "expired";
                UnauthorizedAccessException refused = await Assert.ThrowsAsync<UnauthorizedAccessException>(() => images.AddAsync(1, 1).AsTask());
                Assert.Contains("Unauthenticated", refused.Message, StringComparison.Ordinal);
                Assert.IsType<RpcException>(refused.InnerException);
                await Assert.ThrowsAsync<UnauthorizedAccessException>(() => images.ChecksumAsync(data).AsTask());
                await Assert.ThrowsAsync<UnauthorizedAccessException>(() => images.EchoAsync(data).AsTask());
                await Assert.ThrowsAsync<UnauthorizedAccessException>(async () =>
                {
                    await foreach (ReadOnlyMemory<byte> frame in connection.GetService<IFrameSource>().FramesAsync(3, 100, 1))
                    {
                    }
                });
                await Assert.ThrowsAsync<UnauthorizedAccessException>(() => connection.GetService<IKitchenSink>().CountBytesAsync(Chunks(2, 10)).AsTask());
                await Assert.ThrowsAsync<UnauthorizedAccessException>(() => connection.GetService<IFrameSource>().CountTicksAsync(Ticks(5)).AsTask());
                await Assert.ThrowsAsync<UnauthorizedAccessException>(async () =>
                {
                    await foreach (string line in connection.GetService<ICallProbe>().ChecksumEachAsync(Words(words, 100)))
                    {
                    }
                });
                Assert.True(connection.IsConnected); // refused is not gone: nothing marked the connection down
                token.Value = Token;
                Assert.Equal(Checksum64.Compute(data), await images.ChecksumAsync(data));
            }

            // The same, free to switch: the description is given to an authorized caller over TLS, and a client on this host moves to shared memory.
            await using (OffloadRpcConnection local = await OffloadRpcConnection.ConnectAsync(address, Options(certificate, token, preferSharedMemory: true)))
            {
                Assert.True(local.UsesSharedMemory);
                byte[] data = new byte[(3 << 20) + 1];
                Checksum64.Fill(data, 32);
                Assert.Equal(Checksum64.Compute(data), await local.GetService<IImageService>().ChecksumAsync(data));
                Assert.Equal("caller ChecksumAsync none", (await local.GetService<ICallProbe>().ServerLogAsync()).Last(line => line.StartsWith("caller ChecksumAsync ", StringComparison.Ordinal))); // no HTTP request, no ASP.NET Core identity
            }

            // No token or a wrong one (not authenticated), or one without the policy's role (not authorized): the
            // connection is refused as over shared memory a user the server does not allow is, and nothing is told about the server.
            foreach ((string? wrong, string status) in new[] { ((string?)null, "Unauthenticated"), ("guess", "Unauthenticated"), (Token + "-readonly", "PermissionDenied") })
            {
                UnauthorizedAccessException refused = await Assert.ThrowsAsync<UnauthorizedAccessException>(
                    () => OffloadRpcConnection.ConnectAsync(address, Options(certificate, new StrongBox<string?>(wrong), preferSharedMemory: true)));
                Assert.Contains("refused the connection: " + status, refused.Message, StringComparison.Ordinal);
            }

            // A hosted client refused: its first call and the calls during its backoff are all refused, typed, not "disconnected".
            var services = new ServiceCollection();
            services.AddOffloadRpcClient<IImageService>(address, o =>
            {
                o.PreferSharedMemory = false;
                Configure(o, certificate, new StrongBox<string?>(null));
            });
            await using (ServiceProvider provider = services.BuildServiceProvider())
            {
                IImageService hosted = provider.GetRequiredService<IImageService>();
                for (int i = 0; i < 3; i++)
                {
                    UnauthorizedAccessException refused = await Assert.ThrowsAsync<UnauthorizedAccessException>(() => hosted.AddAsync(1, 2).AsTask());
                    Assert.Contains("Unauthenticated", refused.Message, StringComparison.Ordinal);
                }
            }

            // A certificate the client does not trust (not pinned, and not in the system's store): the server cannot be reached.
            PeerDisconnectedException untrusted = await Assert.ThrowsAsync<PeerDisconnectedException>(() => OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false }));
            Assert.Contains(address, untrusted.Message, StringComparison.Ordinal);
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
            Directory.Delete(directory, recursive: true);
        }
    }

    private static async IAsyncEnumerable<ReadOnlyMemory<byte>> Chunks(int count, int size)
    {
        for (int i = 0; i < count; i++)
        {
            await Task.Yield();
            byte[] chunk = new byte[size];
            chunk.AsSpan().Fill(7); // the bytes CountBytesAsync counts
            chunk[i] = 8;
            yield return chunk;
        }
    }

    /// <summary>Options that trust exactly <paramref name="certificate"/> and send <paramref name="token"/>'s value (none when null), read anew on every call, as a bearer token.</summary>
    private static OffloadRpcOptions Options(X509Certificate2 certificate, StrongBox<string?> token, bool preferSharedMemory)
    {
        var options = new OffloadRpcOptions { PreferSharedMemory = preferSharedMemory };
        Configure(options, certificate, token);
        return options;
    }

    private static void Configure(OffloadRpcOptions options, X509Certificate2 certificate, StrongBox<string?> token)
    {
        string pinned = certificate.GetCertHashString(HashAlgorithmName.SHA256);
        options.ConfigureGrpcChannel(channel =>
        {
            channel.HttpHandler = new System.Net.Http.SocketsHttpHandler
            {
                SslOptions = { RemoteCertificateValidationCallback = (_, presented, _, _) => presented is not null && presented.GetCertHashString(HashAlgorithmName.SHA256) == pinned },
            };
            channel.Credentials = ChannelCredentials.Create(ChannelCredentials.SecureSsl, CallCredentials.FromInterceptor((_, metadata) =>
            {
                if (token.Value is { } value)
                {
                    metadata.Add("Authorization", "Bearer " + value);
                }

                return Task.CompletedTask;
            }));
        });
    }

    private static async IAsyncEnumerable<Tick> Ticks(int count)
    {
        for (int i = 0; i < count; i++)
        {
            await Task.Yield();
            yield return new Tick { Index = i, Label = "t" + i, Checksum = Checksum64.Compute(BitConverter.GetBytes(i)) };
        }
    }

    private static async IAsyncEnumerable<ReadOnlyMemory<ulong>> Words(ulong[] words, int chunk)
    {
        foreach (ulong[] part in words.Chunk(chunk))
        {
            await Task.Yield();
            yield return part;
        }
    }

    /// <summary>A server certificate for 127.0.0.1 and localhost, valid for a day, with its key.</summary>
    private static X509Certificate2 SelfSigned()
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest("CN=127.0.0.1", key, HashAlgorithmName.SHA256);
        var names = new SubjectAlternativeNameBuilder();
        names.AddIpAddress(System.Net.IPAddress.Loopback);
        names.AddDnsName("localhost");
        request.CertificateExtensions.Add(names.Build());
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1")], critical: false)); // server authentication
        return request.CreateSelfSigned(DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddDays(1));
    }
}
